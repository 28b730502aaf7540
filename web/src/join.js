// Limbic's join page: the target of appointment links (and of the clinic console's "Join"). It
// signs in with the link's token (or goes on with the console's sign-in, web/src/handoff.js),
// shows the session, lets a client wait in the waiting room until a therapist admits them (a
// therapist sees the queue and admits), and runs the call with chat beside it.
//
// Flow (spec/appointments.md, spec/sessions.md, spec/calls.md):
//   link token -> org.matrix.login.jwt -> session view -> therapist: join the room, lobby
//   (queue, preview) -> call; client: countdown while the join window is closed -> knock ->
//   admitted (invite) -> join -> call.

import { Call, LocalMedia, mediaProblem } from './call.js';
import { JOIN_STORAGE_KEY as STORAGE_KEY } from './handoff.js';
import { Matrix, MatrixError, RoomSync, jwtClaims, loginWithLink, needsPasscode } from './matrix.js';
import {
  announce, byId, el, formatDateTime, formatDuration, formatTime, localpart, pageShown, setText, showPage, sleep,
} from './ui.js';

const KNOCK_REASON = 'Joining from the appointment link';
const QUEUE_POLL_MS = 2000;
const CALL_RETRY_MS = 3000;
const SPEAKER_ANNOUNCE_MS = 4000;

const app = {
  stored: null, // what sessionStorage keeps: the sign-in, and whether we knocked
  matrix: null,
  roomId: null,
  sync: null,
  view: null, // GET /sessions/{roomId}
  therapist: false,
  therapistNames: [],
  media: new LocalMedia(),
  mediaReady: null, // resolves once the user has devices, or chose to go without
  call: null,
};

// --- sign-in ------------------------------------------------------------------------------

function readStored() {
  try { return JSON.parse(sessionStorage.getItem(STORAGE_KEY)) ?? null; } catch { return null; }
}

function saveStored() {
  sessionStorage.setItem(STORAGE_KEY, JSON.stringify(app.stored));
}

function forgetStored() {
  sessionStorage.removeItem(STORAGE_KEY);
  app.stored = null;
}

/** The link's room: its token's audience is `limbic-join:<room id>`. */
function linkRoom(claims) {
  const audiences = [claims?.aud].flat().filter((a) => typeof a === 'string');
  return audiences.find((a) => a.startsWith('limbic-join:'))?.slice('limbic-join:'.length) ?? null;
}

/** Takes the token out of the address bar and history: it signs in once, and is a secret. */
function dropTokenFromUrl() {
  history.replaceState(null, '', location.pathname);
}

/** The sign-in for this page: from the link's token, or kept from before a reload. */
async function signIn() {
  const token = new URLSearchParams(location.search).get('token');
  const stored = readStored();
  if (!token) {
    if (stored) return stored;
    showExpired('This page opens from the link in your appointment invitation, and this address has no link token.');
    return null;
  }
  const claims = jwtClaims(token);
  const roomId = linkRoom(claims);
  if (!roomId) {
    dropTokenFromUrl();
    showExpired('This is not an appointment link.');
    return null;
  }
  // A reload after signing in: the token is spent, the sign-in it gave goes on.
  if (stored && stored.jti === claims.jti && stored.roomId === roomId) {
    dropTokenFromUrl();
    return stored;
  }
  try {
    const signedIn = await loginWithLink(token);
    dropTokenFromUrl();
    return { ...signedIn, roomId: signedIn.roomId || roomId, jti: claims.jti, knocked: false };
  } catch (error) {
    if (error instanceof MatrixError && error.status >= 400 && error.status < 500) {
      dropTokenFromUrl();
      showExpired(error.message);
      return null;
    }
    throw error; // the network or the server: a reload may work, so the token stays
  }
}

function showExpired(reason) {
  // Server errors are sentence fragments ("this appointment link has expired").
  const sentence = reason.charAt(0).toUpperCase() + reason.slice(1);
  setText('expired-reason', /[.!?]$/.test(sentence) ? sentence : `${sentence}.`);
  showPage('expired');
}

/** Shows what went wrong; a refused sign-in means the link's session is over for this page. */
function fail(error) {
  console.error(error);
  if (error instanceof MatrixError && error.status === 401) {
    forgetStored();
    showExpired(`Your sign-in has ended (${error.message}).`);
    return;
  }
  const offline = error instanceof TypeError; // fetch's way of saying the network failed
  setText('error-message', offline ? 'The page could not reach the server. Check your internet connection.' : error.message);
  showPage('error');
}

// --- the session --------------------------------------------------------------------------

function isTherapistRole(role) {
  return role === 'therapist' || role === 'co_therapist';
}

async function loadSession() {
  app.view = await app.matrix.session(app.roomId);
  const therapists = Object.entries(app.view.roles ?? {}).filter(([, role]) => isTherapistRole(role)).map(([user]) => user);
  app.therapistNames = await Promise.all(therapists.map((user) => app.matrix.displayName(user)));
  renderSessionCards();
}

function renderSessionCards() {
  const { session } = app.view;
  byId('topbar-title').textContent = session.title;
  const rows = [
    ['Session', session.title],
    [app.therapistNames.length > 1 ? 'Therapists' : 'Therapist', app.therapistNames.join(', ') || '—'],
    ['Starts', formatDateTime(session.starts_at)],
    ['Ends', formatTime(session.ends_at)],
  ];
  for (const card of document.querySelectorAll('[data-session-card]')) {
    card.replaceChildren(...rows.flatMap(([term, value]) => [el('dt', { text: term }), el('dd', { text: value })]));
  }
}

/** Shows the page for a session nobody can join any more; true if it did. */
function showIfOver(session) {
  if (session.status === 'cancelled') {
    showPage('cancelled');
    return true;
  }
  if (session.status === 'completed' || session.status === 'no_show' || Date.now() > session.ends_at) {
    showPage('ended');
    return true;
  }
  return false;
}

function isFull(error) {
  return error instanceof MatrixError && error.status === 403 && /full|limit/i.test(error.message);
}

function showFull(error) {
  setText('full-detail', `The server said: ${error.message}.`);
  showPage('full');
}

/** The live countdown until the join window opens; resolves with the session view once open. */
async function countdown() {
  showPage('countdown');
  announce(`Your session opens at ${formatTime(app.view.join_window.opens_at)}.`);
  for (;;) {
    const remaining = app.view.join_window.opens_at - Date.now();
    if (remaining > 0) {
      setText('countdown-remaining', formatDuration(remaining));
      await sleep(Math.min(1000, remaining));
      continue;
    }
    setText('countdown-remaining', formatDuration(0));
    // The server decides; this browser's clock may be off.
    app.view = await app.matrix.session(app.roomId);
    if (app.view.join_window.open || showIfOver(app.view.session)) return;
    await sleep(5000);
  }
}

// --- camera and microphone before the call --------------------------------------------------

function place(elementId, slotId) {
  byId(slotId).append(byId(elementId));
}

/**
 * Gets the camera and microphone for the preview. If the browser refuses both, the
 * permissions page explains how to allow them and offers joining without; `homePage` is the
 * page to go back to. Resolves once the user can join.
 */
function prepareMedia(homePage, previewSlot) {
  place('preview', previewSlot);
  app.mediaReady = (async () => {
    setText('preview-status', 'Asking your browser for the camera and microphone…');
    let failures = await app.media.acquire();
    while (!app.media.audio && !app.media.video) {
      if ((await askForPermission(failures.video ?? failures.audio)) === 'continue') break;
      failures = await app.media.acquire();
    }
    if (pageShown() === 'permissions') showPage(homePage);
    attachPreview();
    await fillDeviceLists();
    const limited = !app.media.audio && !app.media.video ? 'You join without camera or microphone: others can\'t see or hear you.'
      : !app.media.video ? 'Your camera isn\'t available: you join with sound only.'
        : !app.media.audio ? 'Your microphone isn\'t available: others won\'t hear you.' : null;
    setText('preview-status', limited ?? 'Your camera and microphone are ready.');
    if (limited) announce(limited);
  })();
  return app.mediaReady;
}

/** The permissions page; resolves with `retry` or `continue`. */
function askForPermission(error) {
  const detail = {
    denied: 'Your browser blocked the camera and microphone for this page.',
    missing: 'No camera or microphone was found on this device.',
    busy: 'Your camera or microphone is in use by another app.',
    other: `The camera and microphone could not be started (${error?.message ?? 'unknown error'}).`,
  }[mediaProblem(error)];
  setText('permissions-detail', detail);
  showPage('permissions');
  return new Promise((resolve) => {
    const retry = byId('permissions-retry');
    const go = byId('permissions-continue');
    const done = (choice) => () => { retry.onclick = null; go.onclick = null; resolve(choice); };
    retry.onclick = done('retry');
    go.onclick = done('continue');
  });
}

function attachPreview() {
  const video = byId('preview-video');
  if (app.media.video) app.media.video.attach(video);
  byId('preview-off').hidden = !!app.media.video;
  video.hidden = !app.media.video;
}

async function fillDeviceLists() {
  const devices = await app.media.devices();
  fillSelect(byId('camera-select'), devices.videoinput, app.media.currentDevice('videoinput'), 'No camera available');
  fillSelect(byId('mic-select'), devices.audioinput, app.media.currentDevice('audioinput'), 'No microphone available');
}

function fillSelect(select, devices, current, none) {
  const options = devices.map((device, i) => el('option', { value: device.deviceId, text: device.label || `Device ${i + 1}` }));
  select.replaceChildren(...(options.length ? options : [el('option', { value: '', text: none })]));
  select.disabled = !options.length || !current;
  if (current) select.value = current;
}

async function switchDevice(kind, select) {
  try {
    await app.media.useDevice(kind, select.value);
    announce(`Switched to ${select.selectedOptions[0]?.textContent}.`);
  } catch (error) {
    announce(`Could not switch the device: ${error.message}`, { assertive: true });
    select.value = app.media.currentDevice(kind) ?? '';
  }
}

// --- therapist ------------------------------------------------------------------------------

async function therapistFlow() {
  // Clients get call tokens only while the session is open: a therapist arriving opens it.
  if (app.view.session.status === 'scheduled') {
    await app.matrix.setStatus(app.roomId, 'open').catch((error) => announce(`Could not open the session: ${error.message}`));
  }
  try {
    await app.matrix.join(app.roomId);
  } catch (error) {
    if (isFull(error)) return showFull(error);
    throw error;
  }
  await app.sync.start();
  showPage('lobby');
  place('queue', 'lobby-queue-slot');
  pollQueue();
  await prepareMedia('lobby', 'lobby-preview-slot');
  byId('join-call').disabled = false;
}

/**
 * The waiting room, every QUEUE_POLL_MS from the therapist's arrival on (also while they are
 * out of the call: arrivals are announced, and the queue is there when they rejoin).
 */
async function pollQueue() {
  let shown = '';
  for (;;) {
    try {
      const { waiting } = await app.matrix.waiting(app.roomId);
      const key = JSON.stringify(waiting.map((w) => w.user_id));
      if (key !== shown) {
        const before = new Set(JSON.parse(shown || '[]'));
        for (const entry of waiting) {
          if (!before.has(entry.user_id)) announce(`${entry.displayname || localpart(entry.user_id)} is waiting to be let in.`);
        }
        renderQueue(waiting);
        shown = key;
      }
    } catch (error) {
      if (error instanceof MatrixError && error.status === 401) return fail(error);
    }
    await sleep(QUEUE_POLL_MS);
  }
}

function renderQueue(waiting) {
  const list = byId('queue-list');
  const focused = list.contains(document.activeElement);
  byId('queue-empty').hidden = waiting.length > 0;
  byId('queue-heading').textContent = waiting.length ? `Waiting room (${waiting.length})` : 'Waiting room';
  list.replaceChildren(...waiting.map((entry) => {
    const name = entry.displayname || localpart(entry.user_id);
    const since = entry.since ? `waiting since ${formatTime(entry.since)}` : 'waiting';
    return el('li', { class: 'queue-entry', 'data-testid': 'waiting-entry', 'data-user': entry.user_id },
      el('span', { class: 'queue-name', text: name }),
      el('span', { class: 'hint', text: since }),
      el('span', { class: 'button-row' },
        el('button', {
          type: 'button', class: 'button button-small', 'data-testid': 'admit', 'aria-label': `Admit ${name}`, text: 'Admit',
          onclick: (event) => answerKnock(event.currentTarget, entry.user_id, name, true),
        }),
        el('button', {
          type: 'button', class: 'button button-small button-secondary', 'data-testid': 'decline', 'aria-label': `Decline ${name}`, text: 'Decline',
          onclick: (event) => answerKnock(event.currentTarget, entry.user_id, name, false),
        })));
  }));
  // The entry that had focus is gone: keep the keyboard user in the queue.
  if (focused && !list.contains(document.activeElement)) {
    const heading = byId('queue-heading');
    heading.tabIndex = -1;
    heading.focus();
  }
}

async function answerKnock(button, userId, name, admit) {
  button.disabled = true;
  try {
    if (admit) await app.matrix.admit(app.roomId, userId);
    else await app.matrix.decline(app.roomId, userId);
    announce(admit ? `${name} is let in and joins in a moment.` : `You declined ${name}.`);
    button.closest('li')?.remove();
  } catch (error) {
    button.disabled = false;
    announce(`Could not ${admit ? 'admit' : 'decline'} ${name}: ${error.message}`, { assertive: true });
  }
}

// --- client ---------------------------------------------------------------------------------

async function clientFlow() {
  await app.sync.start();
  if (app.sync.membership === 'join') {
    // Admitted before (this is a reload): straight back to the call.
    showPage('waiting');
    setText('waiting-status', 'Joining the call…');
    await prepareMedia('waiting', 'waiting-preview-slot');
  } else {
    if (!app.view.join_window.open) {
      await countdown();
      if (showIfOver(app.view.session)) return;
    }
    if (!(await waitToBeAdmitted())) return;
  }
  await enterCall();
}

/** Asks for the session's passcode (saying the last one was wrong, if so); resolves with it. */
function askPasscode(wrong) {
  showPage('passcode');
  byId('passcode-wrong').hidden = !wrong;
  const input = byId('passcode-input');
  input.value = '';
  return new Promise((resolve) => {
    byId('passcode-form').onsubmit = (event) => {
      event.preventDefault();
      const passcode = input.value.trim();
      if (passcode) resolve(passcode);
    };
  });
}

/**
 * A knock or join (`attempt(passcode)`) that, while the session refuses it for its passcode,
 * asks for one and tries again; then shows `page` again. The passcode is kept with the sign-in
 * for this tab, so that a reload does not ask again.
 */
async function withPasscode(page, attempt) {
  for (;;) {
    const given = app.stored.passcode ?? null;
    try {
      return await attempt(given);
    } catch (error) {
      if (!needsPasscode(error)) throw error;
      app.stored.passcode = await askPasscode(given !== null);
      saveStored();
      showPage(page);
    }
  }
}

/**
 * The waiting room: knock, and wait for a therapist to admit (an invite) or decline (a leave
 * by someone else). Resolves true once this user has joined the room.
 */
async function waitToBeAdmitted() {
  showPage('waiting');
  const ready = app.mediaReady ?? prepareMedia('waiting', 'waiting-preview-slot');
  const me = app.matrix.userId;
  const membership = app.sync.membership;
  const admittedAlready = membership === 'invite' && app.stored.knocked;
  if (membership !== 'knock' && !admittedAlready) {
    // An appointment's client is invited when it is booked; an invited user cannot knock, so
    // the invitation is set aside and the therapist lets them in from the waiting room.
    if (membership === 'invite') {
      await app.matrix.leave(app.roomId, 'Waiting in the waiting room');
      app.sync.assume('leave', me);
    }
    await withPasscode('waiting', (passcode) => app.matrix.knock(app.roomId, KNOCK_REASON, passcode));
    app.sync.assume('knock', me);
    app.stored.knocked = true;
    saveStored();
  }
  const names = app.therapistNames.join(' or ') || 'your therapist';
  setText('waiting-status', `Waiting for ${names} to let you in.`);
  announce(`You're in the waiting room. Waiting for ${names} to let you in.`);

  const outcome = await app.sync.waitForMembership((m) =>
    m === 'invite' || m === 'join' || ((m === 'leave' || m === 'ban') && app.sync.membershipSender !== me));
  if (outcome === 'leave' || outcome === 'ban') {
    app.stored.knocked = false;
    saveStored();
    stopMedia(); // no camera on while nobody is waiting for this user
    showPage('declined');
    return false;
  }
  setText('waiting-status', 'You\'ve been let in. Joining the call…');
  announce('You\'ve been let in. Joining the call.');
  if (outcome === 'invite') {
    try {
      await withPasscode('waiting', (passcode) => app.matrix.join(app.roomId, passcode));
    } catch (error) {
      if (isFull(error)) { showFull(error); return false; }
      throw error;
    }
  }
  await ready;
  return true;
}

// --- the call -------------------------------------------------------------------------------

async function enterCall() {
  showPage('call');
  place('devices', 'call-devices-slot');
  if (app.therapist) place('queue', 'call-queue-slot');
  setText('call-status', 'Connecting to the call…');
  updateSessionState();
  const call = new Call({
    matrix: app.matrix,
    roomId: app.roomId,
    media: app.media,
    tiles: byId('tiles'),
    audioSink: byId('audio-sink'),
    moderator: app.therapist,
    events: onCallEvent,
  });
  app.call = call;
  while (app.call === call) {
    try {
      await call.connect();
      break;
    } catch (error) {
      if (app.call !== call) return; // left while connecting
      if (!(error instanceof MatrixError && error.status === 403) || app.therapist) throw error;
      // The call opens with the session: a client may be early for it.
      setText('call-status', 'Waiting for your therapist to start the call…');
      await sleep(CALL_RETRY_MS);
    }
  }
  if (app.call !== call) { // left while waiting for the call to open
    await call.leave();
    return;
  }
  setText('call-status', 'You\'re in the call.');
  announce('You\'re in the call.');
  if (app.therapist && app.view.session.status === 'open') {
    await app.matrix.setStatus(app.roomId, 'in_progress').catch(() => {});
  }
  updateControls();
  updateSessionState();
}

let lastSpeakerAnnounced = 0;

function onCallEvent(event) {
  switch (event.type) {
    case 'joined':
      announce(`${event.name} joined the call.`);
      break;
    case 'left':
      announce(`${event.name} left the call.`);
      break;
    case 'speaker':
      // Often enough to follow who talks, rarely enough not to drown everything else.
      if (Date.now() - lastSpeakerAnnounced > SPEAKER_ANNOUNCE_MS) {
        lastSpeakerAnnounced = Date.now();
        announce(`${event.name} is speaking.`);
      }
      break;
    case 'muted-by-moderator':
      announce('Your therapist muted your microphone. You can unmute yourself.', { assertive: true });
      updateControls();
      break;
    case 'local-changed':
      updateControls();
      break;
    case 'audio-blocked':
      byId('audio-blocked').hidden = !event.blocked;
      break;
    case 'moderated':
      announce(event.message);
      break;
    case 'moderation-failed':
      announce(`That didn't work: ${event.message}`, { assertive: true });
      break;
    case 'disconnected':
      endCall(event.removed ? 'removed' : 'lost');
      break;
    default:
      break;
  }
}

function updateControls() {
  const call = app.call;
  if (!call) return;
  byId('toggle-mic').textContent = call.micEnabled ? 'Mute' : 'Unmute';
  byId('toggle-mic').classList.toggle('control-off', !call.micEnabled);
  byId('toggle-camera').textContent = call.cameraEnabled ? 'Stop camera' : 'Start camera';
  byId('toggle-camera').classList.toggle('control-off', !call.cameraEnabled);
  byId('toggle-screen').textContent = call.screenSharing ? 'Stop sharing' : 'Share screen';
  byId('toggle-screen').hidden = !navigator.mediaDevices?.getDisplayMedia;
}

async function runControl(button, action, done) {
  button.disabled = true;
  try {
    await action();
    if (done) announce(done());
  } catch (error) {
    const problem = mediaProblem(error);
    announce(problem === 'denied' ? 'Your browser blocked that device for this page.' : `That didn't work: ${error.message}`, { assertive: true });
  } finally {
    button.disabled = false;
    updateControls();
  }
}

/** Turns the camera and microphone off; the next preview or call gets them afresh. */
function stopMedia() {
  app.media.stop();
  app.mediaReady = null;
}

/** After leaving, being removed, or losing the connection: the page that says so. */
function endCall(why) {
  app.call = null;
  stopMedia();
  byId('tiles').replaceChildren();
  const texts = {
    left: ['You left the session', 'You can close this page, or rejoin while the session is still on.'],
    removed: ['You were removed from the call', 'Your therapist removed you from the call. You can rejoin if they ask you to.'],
    lost: ['The call was disconnected', 'The connection to the call was lost. Check your internet connection and rejoin.'],
  }[why];
  setText('left-heading', texts[0]);
  setText('left-detail', texts[1]);
  showPage('left');
}

async function rejoin() {
  const home = app.therapist ? 'lobby' : 'waiting';
  showPage(home);
  if (app.therapist) place('queue', 'lobby-queue-slot');
  else setText('waiting-status', 'Joining the call…');
  place('devices', 'preview');
  await prepareMedia(home, `${home}-preview-slot`);
  await enterCall();
}

// --- room state: recording, consent, hands, people --------------------------------------------

function recordingPolicy() {
  return app.sync.stateContent('org.limbic.session')?.recording_policy ?? app.view.session.recording_policy;
}

function updateSessionState() {
  if (!app.sync || !app.view) return;
  const me = app.matrix.userId;
  const recording = !!app.sync.stateContent('org.limbic.recording')?.recording;
  const inCall = pageShown() === 'call';
  byId('recording-indicator').hidden = !recording;

  const withConsent = recordingPolicy() === 'with_consent';
  const consent = app.sync.stateContent('org.limbic.recording.consent', me);
  const answered = typeof consent?.consent === 'boolean';
  byId('consent').hidden = !(inCall && withConsent && !answered);
  byId('consent-answer').hidden = !(inCall && withConsent && answered);
  if (answered) setText('consent-answer-text', consent.consent ? 'You allowed recording.' : 'You didn\'t allow recording.');

  const record = byId('toggle-recording');
  record.hidden = !(app.therapist && withConsent);
  record.textContent = recording ? 'Stop recording' : 'Start recording';

  const raised = app.sync.stateContent('org.limbic.hand', me)?.raised === true;
  byId('toggle-hand').textContent = raised ? 'Lower hand' : 'Raise hand';

  renderPeople();
  app.call?.setRaisedHands(raisedHands(), userOfParticipant);
}

function raisedHands() {
  return app.sync.joinedMembers().filter((user) => app.sync.stateContent('org.limbic.hand', user)?.raised === true);
}

/** Call participants carry their Matrix display name; the room's members map it back. */
function userOfParticipant(participant) {
  const name = participant.name;
  const matches = app.sync.joinedMembers().filter((user) => app.sync.nameOf(user) === name);
  return matches.length === 1 ? matches[0] : null;
}

function renderPeople() {
  const roles = { therapist: 'therapist', co_therapist: 'co-therapist', client: 'client', observer: 'observer' };
  const people = app.sync.joinedMembers().map((user) => {
    const role = app.sync.stateContent('org.limbic.session.role', `_${user}`)?.role;
    const hand = app.sync.stateContent('org.limbic.hand', user)?.raised === true;
    const name = app.sync.nameOf(user) + (user === app.matrix.userId ? ' (you)' : '');
    return el('li', { 'data-user': user },
      el('span', { text: name }),
      role ? el('span', { class: 'hint', text: ` ${roles[role] ?? role}` }) : null,
      hand ? el('span', { class: 'badge badge-hand', text: 'Hand raised' }) : null);
  });
  byId('people').replaceChildren(...people);
}

/** Room state as it changes: announcements first, then the page. */
function onStateEvent(event) {
  const me = app.matrix.userId;
  if (event.type === 'org.limbic.hand' && event.state_key !== me && event.content?.raised === true) {
    announce(`${app.sync.nameOf(event.state_key)} raised their hand.`);
  }
  if (event.type === 'org.limbic.recording') {
    const recording = !!event.content?.recording;
    if (pageShown() === 'call') announce(recording ? 'This session is now being recorded.' : 'Recording stopped.', { assertive: true });
  }
  if (event.type === 'org.limbic.session' && event.content?.status === 'cancelled') {
    app.view.session = { ...app.view.session, ...event.content };
    const call = app.call;
    app.call = null;
    call?.leave();
    stopMedia();
    showPage('cancelled');
    return;
  }
  updateSessionState();
}

// --- chat -----------------------------------------------------------------------------------

function onMessage(event) {
  const body = event.content?.body;
  if (typeof body !== 'string') return;
  const mine = event.sender === app.matrix.userId;
  const log = byId('chat-messages');
  log.append(el('li', { class: mine ? 'message mine' : 'message', 'data-testid': 'chat-message' },
    el('span', { class: 'message-meta' },
      el('span', { class: 'message-sender', text: mine ? 'You' : app.sync.nameOf(event.sender) }),
      ' ',
      el('time', { datetime: new Date(event.origin_server_ts).toISOString(), text: formatTime(event.origin_server_ts) })),
    el('span', { class: 'message-body', text: body })));
  log.scrollTop = log.scrollHeight;
}

async function sendChat(event) {
  event.preventDefault();
  const input = byId('chat-input');
  const body = input.value.trim();
  if (!body) return;
  const button = event.submitter ?? event.target.querySelector('button');
  button.disabled = true;
  try {
    await app.matrix.sendText(app.roomId, body);
    input.value = '';
  } catch (error) {
    announce(`Your message wasn't sent: ${error.message}`, { assertive: true });
  } finally {
    button.disabled = false;
    input.focus();
  }
}

// --- wiring ---------------------------------------------------------------------------------

function wireControls() {
  byId('error-retry').onclick = () => location.reload();
  byId('full-retry').onclick = () => location.reload();
  byId('knock-again').onclick = () => waitToBeAdmitted().then((joined) => joined && enterCall()).catch(fail);
  byId('rejoin').onclick = () => rejoin().catch(fail);
  byId('join-call').onclick = (event) => {
    event.currentTarget.disabled = true;
    enterCall().catch(fail);
  };
  byId('camera-select').onchange = (event) => switchDevice('videoinput', event.target);
  byId('mic-select').onchange = (event) => switchDevice('audioinput', event.target);
  navigator.mediaDevices?.addEventListener('devicechange', () => { if (app.media.audio || app.media.video) fillDeviceLists(); });
  byId('chat-form').onsubmit = sendChat;
  byId('audio-start').onclick = () => app.call?.startAudio();

  byId('toggle-mic').onclick = (e) => runControl(e.currentTarget,
    () => app.call.setMic(!app.call.micEnabled), () => (app.call.micEnabled ? 'Microphone on.' : 'Microphone muted.'));
  byId('toggle-camera').onclick = (e) => runControl(e.currentTarget,
    () => app.call.setCamera(!app.call.cameraEnabled), () => (app.call.cameraEnabled ? 'Camera on.' : 'Camera off.'));
  byId('toggle-screen').onclick = (e) => runControl(e.currentTarget,
    () => app.call.setScreenShare(!app.call.screenSharing), () => (app.call.screenSharing ? 'You are sharing your screen.' : 'Screen sharing stopped.'));
  byId('toggle-hand').onclick = (e) => {
    const raise = app.sync.stateContent('org.limbic.hand', app.matrix.userId)?.raised !== true;
    runControl(e.currentTarget, () => app.matrix.putState(app.roomId, 'org.limbic.hand', app.matrix.userId, { raised: raise }),
      () => (raise ? 'Your hand is raised.' : 'Your hand is lowered.'));
  };
  byId('toggle-recording').onclick = (e) => runControl(e.currentTarget, toggleRecording);
  byId('leave').onclick = async () => {
    const call = app.call;
    app.call = null;
    await call?.leave();
    endCall('left');
  };
  const consent = (value) => () => app.matrix.putState(app.roomId, 'org.limbic.recording.consent', app.matrix.userId, { consent: value })
    .then(() => announce(value ? 'You allowed recording.' : 'You didn\'t allow recording.'))
    .catch((error) => announce(`Your answer wasn't saved: ${error.message}`, { assertive: true }));
  byId('consent-allow').onclick = consent(true);
  byId('consent-decline').onclick = consent(false);
  byId('consent-change').onclick = () => {
    const current = app.sync.stateContent('org.limbic.recording.consent', app.matrix.userId)?.consent === true;
    consent(!current)();
  };

  // For the browser test: video frames decoded from each other participant.
  window.__limbicStats = () => app.call?.videoStats() ?? Promise.resolve({ framesDecoded: 0, participants: [] });
}

async function toggleRecording() {
  const recording = !!app.sync.stateContent('org.limbic.recording')?.recording;
  try {
    await app.matrix.setRecording(app.roomId, !recording);
  } catch (error) {
    const missing = error instanceof MatrixError ? error.body['org.limbic.without_consent'] : null;
    if (Array.isArray(missing) && missing.length) {
      throw new Error(`recording needs everyone's consent; still missing: ${missing.map((u) => app.sync.nameOf(u)).join(', ')}`);
    }
    throw error;
  }
}

async function main() {
  wireControls();
  const signedIn = await signIn();
  if (!signedIn) return;
  app.stored = signedIn;
  saveStored();
  app.matrix = new Matrix(signedIn);
  app.roomId = signedIn.roomId;
  app.sync = new RoomSync(app.matrix, app.roomId);
  app.sync.on('state', onStateEvent);
  app.sync.on('message', onMessage);
  app.sync.on('error', fail);

  await loadSession();
  if (showIfOver(app.view.session)) return;
  app.therapist = isTherapistRole(app.view.roles?.[app.matrix.userId]);
  if (app.therapist) await therapistFlow();
  else await clientFlow();
}

main().catch(fail);
