// A session as its therapist runs it: the status workflow, rescheduling and editing, the call,
// recording with each participant's consent and raised hands, the waiting room (admit, decline), participants and their roles (and sign-in links for
// clients without a Matrix app), notes with their history
// (saved as the therapist types), and the transcript.

import { byId, el } from '../ui.js';
import { openInJoinPage } from '../handoff.js';
import { ApiError, currentSession, mediaBlob, request, requestText, searchUsers, sessionPath } from './api.js';
import { showBreakouts } from './breakouts.js';
import { copy } from './copy.js';
import { followupOf, invoiceOf, renderFollowup, renderInvoice } from './plugins.js';
import { describeRefusal } from './refusals.js';
import { formatInstant, formatStamp, formatTime, timeZones, until, zonedToInstant } from './time.js';

const WAITING_POLL_MS = 3000;
const AUTOSAVE_MS = 1200;
const STATUS_NAMES = {
  scheduled: 'Scheduled', open: 'Open', in_progress: 'In progress', completed: 'Completed', cancelled: 'Cancelled', no_show: 'No-show',
};
const ROLE_NAMES = { therapist: 'Therapist', co_therapist: 'Co-therapist', client: 'Client', observer: 'Observer' };
/** The moves the workflow allows from each status, as buttons: [status, label, needs confirming]. */
const MOVES = {
  scheduled: [['open', 'Open the session', false], ['cancelled', 'Cancel the session', true], ['no_show', 'Mark as no-show', true]],
  open: [['in_progress', 'Mark as started', false], ['cancelled', 'Cancel the session', true], ['no_show', 'Mark as no-show', true]],
  in_progress: [['completed', 'Complete the session', true]],
};
const LIVE = new Set(['scheduled', 'open', 'in_progress']);

let roomId = null;
let view = null;
let waitingTimer = null;
let clock = null;
let onLeave = () => {};

function message(text, { error = false } = {}) {
  const notice = byId('session-message');
  notice.textContent = text ?? '';
  notice.className = error ? 'notice notice-error' : 'notice notice-ok';
  notice.hidden = !text;
}

// --- summary and status --------------------------------------------------------------------

function renderSummary() {
  const { session } = view;
  byId('session-title').textContent = session.title;
  document.title = `${session.title} · Limbic`;
  byId('session-summary').replaceChildren(
    el('dt', { text: 'When' }), el('dd', { text: `${formatInstant(session.starts_at)} – ${formatTime(session.ends_at)}` }),
    el('dt', { text: 'Scheduled in' }), el('dd', { text: session.timezone }),
    el('dt', { text: 'Kind' }), el('dd', { text: session.kind }),
    el('dt', { text: 'Status' }), el('dd', { text: STATUS_NAMES[session.status] ?? session.status, 'data-testid': 'session-status' }),
    el('dt', { text: 'Participant limit' }), el('dd', { text: String(session.max_participants) }),
    el('dt', { text: 'Join window' }), el('dd', { text: `${session.join_window_minutes} minutes before the start` }),
    el('dt', { text: 'Recording' }), el('dd', { text: session.recording_policy === 'with_consent' ? "With everyone's consent" : 'Never' }),
  );
  const actions = [];
  if (LIVE.has(session.status)) {
    actions.push(el('button', {
      type: 'button', class: 'button', text: 'Join the call', 'data-testid': 'session-join', 'aria-describedby': 'session-countdown',
      onclick: () => openInJoinPage(currentSession(), roomId),
    }));
  }
  for (const [status, label, confirmFirst] of MOVES[session.status] ?? []) {
    actions.push(el('button', {
      type: 'button', class: 'button button-secondary', text: label, 'data-status': status,
      onclick: () => moveTo(status, label, confirmFirst),
    }));
  }
  byId('session-actions').replaceChildren(...actions);
  byId('session-edit-panel').hidden = !LIVE.has(session.status);
  tick();
}

/** The countdown to the join window, and "Join the call" from the window on. */
function tick(now = Date.now()) {
  const { session } = view;
  const opensAt = view.join_window.opens_at;
  const join = document.querySelector('[data-testid="session-join"]');
  if (join) join.disabled = now < opensAt;
  byId('session-countdown').textContent = !LIVE.has(session.status) ? ''
    : now < opensAt ? `The call opens in ${until(opensAt - now)} (${view.session.join_window_minutes} minutes before the start).`
      : now < session.starts_at ? `The call is open; the session starts in ${until(session.starts_at - now)}.`
        : now < session.ends_at ? `The session is on: it ends in ${until(session.ends_at - now)}.` : 'The session is past its end time.';
}

async function moveTo(status, label, confirmFirst) {
  if (confirmFirst && !window.confirm(`${label}? This cannot be undone.`)) return;
  try {
    const answer = await request('PUT', `${sessionPath(roomId)}/status`, { body: { status } });
    view = await request('GET', sessionPath(roomId));
    renderSummary();
    fillEditForm();
    loadInvoice();
    loadFollowup();
    loadLive();
    message(`The session is now ${STATUS_NAMES[answer.session.status].toLowerCase()}.`);
  } catch (error) {
    message(`The status could not be changed: ${error.message}.`, { error: true });
  }
}

// --- rescheduling and editing --------------------------------------------------------------

function fieldError(id, text) {
  const node = byId(`${id}-error`);
  node.textContent = text ?? '';
  node.hidden = !text;
  const input = document.querySelector(`[aria-describedby~="${id}-error"]`);
  input?.setAttribute('aria-invalid', text ? 'true' : 'false');
  return input;
}

/** The date and time of `ms` on the clocks of `zone`, for the form. */
function inZone(ms, zone) {
  const parts = Object.fromEntries(new Intl.DateTimeFormat('en-CA', {
    timeZone: zone, hourCycle: 'h23', year: 'numeric', month: '2-digit', day: '2-digit', hour: '2-digit', minute: '2-digit',
  }).formatToParts(new Date(ms)).map((part) => [part.type, part.value]));
  return { date: `${parts.year}-${parts.month}-${parts.day}`, time: `${parts.hour}:${parts.minute}` };
}

function fillEditForm() {
  const { session } = view;
  const zones = timeZones();
  byId('edit-timezone').replaceChildren(...(zones.includes(session.timezone) ? zones : [session.timezone, ...zones])
    .map((zone) => el('option', { value: zone, text: zone.replaceAll('_', ' ') })));
  const { date, time } = inZone(session.starts_at, session.timezone);
  byId('edit-title').value = session.title;
  byId('edit-date').value = date;
  byId('edit-time').value = time;
  byId('edit-duration').value = String(Math.round((session.ends_at - session.starts_at) / 60_000));
  byId('edit-timezone').value = session.timezone;
  byId('edit-limit').value = String(session.max_participants);
  byId('edit-window').value = String(session.join_window_minutes);
  byId('edit-recording').value = session.recording_policy;
  for (const id of ['edit-title', 'edit-time', 'edit-limit']) fieldError(id, null);
  byId('edit-error').hidden = true;
}

async function saveEdit(event) {
  event.preventDefault();
  for (const id of ['edit-title', 'edit-time', 'edit-limit']) fieldError(id, null);
  byId('edit-error').hidden = true;
  const zone = byId('edit-timezone').value;
  const startsAt = zonedToInstant(byId('edit-date').value, byId('edit-time').value, zone);
  const changes = {
    title: byId('edit-title').value.trim(),
    starts_at: startsAt,
    ends_at: startsAt + Number(byId('edit-duration').value) * 60_000,
    timezone: zone,
    max_participants: Number(byId('edit-limit').value),
    join_window_minutes: Number(byId('edit-window').value),
    recording_policy: byId('edit-recording').value,
  };
  try {
    await request('PATCH', sessionPath(roomId), { body: changes });
    view = await request('GET', sessionPath(roomId));
    renderSummary();
    fillEditForm();
    message('The changes are saved.');
    byId('session-title').focus();
  } catch (error) {
    if (!(error instanceof ApiError)) throw error;
    const { field, message: text } = describeRefusal(error, 'change the session');
    if (field && field !== 'clients') {
      fieldError(`edit-${field}`, text)?.focus();
    } else {
      byId('edit-error').textContent = text;
      byId('edit-error').hidden = false;
    }
  }
}

// --- the waiting room ----------------------------------------------------------------------

async function answerKnock(userId, answer) {
  const error = byId('waiting-error');
  error.hidden = true;
  try {
    await request('POST', `${sessionPath(roomId)}/waiting/${encodeURIComponent(userId)}/${answer}`, { body: {} });
    message(answer === 'admit' ? `${userId} is let in.` : `${userId} was not let in.`);
  } catch (failure) {
    error.textContent = /full/i.test(failure.message)
      ? `${userId} cannot be let in: ${failure.message}. Raise the participant limit, or wait until someone leaves.`
      : `${userId} could not be ${answer === 'admit' ? 'let in' : 'declined'}: ${failure.message}.`;
    error.hidden = false;
  }
  await loadWaiting();
}

async function loadWaiting() {
  try {
    const { waiting } = await request('GET', `${sessionPath(roomId)}/waiting`);
    byId('waiting-empty').hidden = waiting.length > 0;
    byId('waiting-list').replaceChildren(...waiting.map((entry) => el('li', { class: 'queue-entry', 'data-user': entry.user_id },
      el('span', { class: 'queue-name', text: entry.displayname ? `${entry.displayname} (${entry.user_id})` : entry.user_id }),
      el('span', { class: 'hint', text: `Waiting since ${formatTime(entry.since)}` }),
      el('span', { class: 'button-row' },
        el('button', { type: 'button', class: 'button button-small', text: 'Admit', 'data-testid': 'admit', onclick: () => answerKnock(entry.user_id, 'admit') }),
        el('button', { type: 'button', class: 'button button-small button-secondary', text: 'Decline', 'data-testid': 'decline', onclick: () => answerKnock(entry.user_id, 'decline') })),
    )));
  } catch (error) {
    byId('waiting-error').textContent = `The waiting room could not be loaded: ${error.message}.`;
    byId('waiting-error').hidden = false;
  }
}

// --- recording, consent and hands ----------------------------------------------------------

let recordingOn = false;

/** The room's state as the session's therapist reads it: who consents, whose hand is up. */
async function loadLive() {
  let state;
  try {
    state = await request('GET', `/_matrix/client/v3/rooms/${encodeURIComponent(roomId)}/state`);
  } catch {
    return;
  }
  const content = (type, key) => state.find((event) => event.type === type && event.state_key === key)?.content ?? null;
  const recording = content('org.limbic.recording', '');
  recordingOn = recording?.recording === true;
  const allowed = view.session.recording_policy === 'with_consent';
  byId('recording-line').textContent = !allowed
    ? 'This session is never recorded.'
    : recordingOn ? `Recording, started by ${recording.by}.` : `Not recording${recording?.stopped_because ? ` (stopped: ${recording.stopped_because})` : ''}. It can be, while everyone in the call consents.`;
  const toggle = byId('recording-toggle');
  toggle.hidden = !allowed || !LIVE.has(view.session.status);
  toggle.textContent = recordingOn ? 'Stop recording' : 'Start recording';
  const others = Object.entries(view.roles).filter(([, role]) => role !== 'therapist' && role !== 'co_therapist');
  byId('live-people').replaceChildren(...others.map(([userId]) => {
    const consent = content('org.limbic.recording.consent', userId)?.consent;
    const hand = content('org.limbic.hand', userId)?.raised === true;
    return el('li', { 'data-user': userId },
      el('span', { class: 'mono', text: userId }),
      allowed ? ` · ${consent === true ? 'consents to recording' : consent === false ? 'does not consent to recording' : 'has not answered about recording'}` : '',
      hand ? el('span', { class: 'tag tag-hand', text: 'Hand raised', 'data-testid': 'hand-raised' }) : null);
  }));
}

async function toggleRecording() {
  const error = byId('recording-error');
  error.hidden = true;
  try {
    await request('PUT', `${sessionPath(roomId)}/recording`, { body: { recording: !recordingOn } });
    message(recordingOn ? 'The recording stopped; its files are listed below.' : 'Recording.');
  } catch (failure) {
    error.textContent = recordingOn ? `The recording could not be stopped: ${failure.message}.` : `The recording could not start: ${failure.message}.`;
    error.hidden = false;
  }
  await Promise.all([loadLive(), loadRecordings()]);
}

// --- participants --------------------------------------------------------------------------

/** A fresh sign-in link for a client without a Matrix app, shown under their name to copy. */
async function makeLink(userId, slot) {
  try {
    const { url, expires_at: expiresAt } = await request('POST', `${sessionPath(roomId)}/links/${encodeURIComponent(userId)}`);
    const copied = el('span', { class: 'hint', role: 'status' });
    slot.replaceChildren(
      el('p', { class: 'mono', text: url, 'data-testid': 'client-link' }),
      el('p', { class: 'hint', text: `It signs ${userId} in once, into this session, until ${formatTime(expiresAt)}. Send it to them privately.` }),
      el('button', {
        type: 'button', class: 'button button-small button-secondary', text: 'Copy the link',
        onclick: () => copy(url, copied, 'the link above'),
      }), ' ', copied);
  } catch (error) {
    slot.replaceChildren(el('p', { class: 'field-error', text: `No link could be made: ${error.message}.` }));
  }
}

function renderPeople() {
  const me = currentSession()?.user_id;
  byId('people-list').replaceChildren(...Object.entries(view.roles).map(([userId, role]) => {
    const slot = el('div', { class: 'link-slot' });
    return el('li', { 'data-user': userId },
      el('span', { class: 'mono', text: userId }), ` · ${ROLE_NAMES[role] ?? role} `,
      role === 'client' || role === 'observer' ? el('button', {
        type: 'button', class: 'button-link', text: 'Sign-in link', 'aria-label': `A sign-in link for ${userId}`, 'data-testid': 'make-link',
        onclick: () => makeLink(userId, slot),
      }) : null,
      role === 'therapist' || userId === me ? null : el('button', {
        type: 'button', class: 'button-link', text: 'Remove', 'aria-label': `Remove ${userId} from the session`,
        onclick: () => changePerson(userId, null),
      }),
      slot);
  }));
}

async function changePerson(userId, role) {
  byId('people-error').hidden = true;
  try {
    const path = `${sessionPath(roomId)}/participants/${encodeURIComponent(userId)}`;
    if (role) await request('PUT', path, { body: { role } });
    else await request('DELETE', path);
    view = await request('GET', sessionPath(roomId));
    renderPeople();
    showBreakouts(roomId, view);
    message(role ? `${userId} is now a ${ROLE_NAMES[role].toLowerCase()} of the session.` : `${userId} is no longer in the session.`);
  } catch (error) {
    byId('people-error').textContent = `${userId} could not be ${role ? 'added' : 'removed'}: ${error.message}.`;
    byId('people-error').hidden = false;
  }
}

let peopleTimer = null;
function searchPeople(term) {
  clearTimeout(peopleTimer);
  peopleTimer = setTimeout(async () => {
    const results = byId('people-results');
    if (term.trim().length < 2) return results.replaceChildren();
    try {
      const users = (await searchUsers(term.trim())).filter((user) => !view.roles[user.user_id]);
      results.replaceChildren(...users.map((user) => el('li', {}, el('button', {
        type: 'button', class: 'choice', text: user.display_name ? `${user.display_name} (${user.user_id})` : user.user_id,
        onclick: () => {
          results.replaceChildren();
          byId('people-search').value = '';
          changePerson(user.user_id, byId('people-role').value);
        },
      }))));
    } catch (error) {
      results.replaceChildren(el('li', { class: 'field-error', text: error.message }));
    }
  }, 250);
}

// --- notes ---------------------------------------------------------------------------------

let notes = [];
let currentNote = null;
let saveTimer = null;

async function loadNotes(select = currentNote) {
  try {
    ({ notes } = await request('GET', `${sessionPath(roomId)}/notes`));
  } catch (error) {
    byId('notes-list').replaceChildren(el('li', { class: 'field-error', text: `The notes could not be loaded: ${error.message}.` }));
    return;
  }
  byId('notes-list').replaceChildren(...notes.map((note, index) => el('li', {}, el('button', {
    type: 'button', class: 'choice', 'aria-current': note.note_id === currentNote ? 'true' : undefined,
    text: (note.versions[0]?.content?.body ?? '').split('\n')[0].slice(0, 60) || `Note ${index + 1}`,
    onclick: () => openNote(note.note_id),
  }))));
  if (select) openNote(select, { keepText: true });
}

function openNote(noteId, { keepText = false } = {}) {
  currentNote = noteId;
  const note = notes.find((n) => n.note_id === noteId);
  byId('note-editor').hidden = false;
  if (!keepText) byId('note-body').value = note?.versions[0]?.content?.body ?? '';
  byId('note-history').replaceChildren(...(note?.versions ?? []).map((version) => el('li', {},
    el('span', { text: `${formatStamp(Number(version.ts))} by ${version.author}` }),
    el('details', {}, el('summary', { text: 'Show this version' }), el('pre', { class: 'note-version', text: version.content?.body ?? '' })))));
  for (const button of byId('notes-list').querySelectorAll('button')) button.removeAttribute('aria-current');
}

async function saveNote() {
  if (!currentNote) return;
  const status = byId('note-status');
  status.textContent = 'Saving…';
  try {
    await request('PUT', `${sessionPath(roomId)}/notes/${encodeURIComponent(currentNote)}`, { body: { body: byId('note-body').value } });
    status.textContent = `Saved at ${formatTime(Date.now())}.`;
    await loadNotes(currentNote);
  } catch (error) {
    status.textContent = `Not saved: ${error.message}. Your text is still here; it is saved again as you type.`;
  }
}

// --- invoice -------------------------------------------------------------------------------

/** How often a plugin's answer about a just-completed session is looked for again. */
const PLUGIN_RETRIES = 15;

/** The billing plugin's invoice, once the session is completed (it comes a moment after). */
async function loadInvoice(retries = PLUGIN_RETRIES) {
  const panel = byId('session-invoice');
  if (view.session.status !== 'completed') {
    panel.hidden = true;
    return;
  }
  try {
    const invoice = await invoiceOf(roomId);
    panel.hidden = invoice === undefined;
    byId('invoice-body').replaceChildren(invoice ? renderInvoice(invoice) : el('p', { class: 'hint', text: 'The invoice is being made…', 'data-testid': 'invoice-pending' }));
    if (invoice === null && retries > 0) setTimeout(() => { if (view?.session.status === 'completed') loadInvoice(retries - 1); }, 2000);
  } catch (error) {
    panel.hidden = false;
    byId('invoice-body').replaceChildren(el('p', { class: 'field-error', text: `The invoice could not be loaded: ${error.message}.` }));
  }
}

/** The followup plugin's chat, once a group session is completed (it comes a moment after). */
async function loadFollowup(retries = PLUGIN_RETRIES) {
  const panel = byId('session-followup');
  if (view.session.status !== 'completed') {
    panel.hidden = true;
    return;
  }
  try {
    const followup = await followupOf(roomId);
    panel.hidden = !followup;
    if (followup) byId('followup-body').replaceChildren(renderFollowup(view.session.title, followup));
    else if (followup === null && retries > 0) setTimeout(() => { if (view?.session.status === 'completed') loadFollowup(retries - 1); }, 2000);
  } catch {
    panel.hidden = true;
  }
}

// --- recordings ----------------------------------------------------------------------------

/** Saves a Blob under `name` through a temporary link. */
function saveBlob(blob, name) {
  const url = URL.createObjectURL(blob);
  const link = el('a', { href: url, download: name, hidden: true });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

async function loadRecordings() {
  let recordings = [];
  try {
    ({ recordings } = await request('GET', `${sessionPath(roomId)}/recordings`));
  } catch (error) {
    byId('recordings-empty').textContent = `The recordings could not be loaded: ${error.message}.`;
    return;
  }
  byId('recordings-empty').hidden = recordings.length > 0;
  byId('recordings-list').replaceChildren(...recordings.map((recording) => {
    const player = el('div', { class: 'player' });
    const status = el('span', { class: 'hint', role: 'status' });
    const what = `${recording.kind === 'm.audio' ? 'Sound' : 'Video'} of ${recording.owner}`;
    return el('li', { 'data-recording': recording.event_id },
      el('p', {}, el('strong', { text: what }), ` · ${Math.round(recording.duration / 1000)} s · ${formatStamp(recording.ts)}`),
      el('div', { class: 'button-row' },
        recording.kind === 'm.audio' ? el('button', {
          type: 'button', class: 'button button-small', text: 'Play', 'aria-label': `Play the ${what.toLowerCase()}`, 'data-testid': 'recording-play',
          onclick: async () => {
            try {
              const audio = el('audio', { controls: true, 'aria-label': what, 'data-testid': 'recording-audio' });
              audio.src = URL.createObjectURL(await mediaBlob(recording.url));
              player.replaceChildren(audio);
              audio.play().catch(() => {});
            } catch (error) {
              status.textContent = `It cannot be played: ${error.message}.`;
            }
          },
        }) : null,
        el('button', {
          type: 'button', class: 'button button-small button-secondary', text: 'Download', 'aria-label': `Download the ${what.toLowerCase()}`,
          onclick: async () => {
            try {
              saveBlob(await mediaBlob(recording.url), recording.filename || 'recording');
              status.textContent = `Downloaded ${recording.filename}.`;
            } catch (error) {
              status.textContent = `It cannot be downloaded: ${error.message}.`;
            }
          },
        }), status),
      player);
  }));
}

// --- transcript ----------------------------------------------------------------------------

async function downloadTranscript(format) {
  const status = byId('transcript-status');
  status.textContent = 'Preparing the transcript…';
  try {
    const text = await requestText('GET', `${sessionPath(roomId)}/transcript`, { query: { format } });
    const type = format === 'markdown' ? 'text/markdown' : 'text/plain';
    const name = `${view.session.title.replace(/[^\p{L}\p{N}]+/gu, '-').replace(/^-|-$/g, '') || 'session'}-transcript.${format === 'markdown' ? 'md' : 'txt'}`;
    saveBlob(new Blob([text], { type }), name);
    status.textContent = `Downloaded ${name}.`;
  } catch (error) {
    status.textContent = `The transcript could not be made: ${error.message}.`;
  }
}

// --- the page ------------------------------------------------------------------------------

let wired = false;

function wire() {
  wired = true;
  byId('session-edit').addEventListener('submit', (event) => { saveEdit(event); });
  byId('recording-toggle').addEventListener('click', toggleRecording);
  byId('people-search').addEventListener('input', (event) => searchPeople(event.target.value));
  byId('people-add').addEventListener('submit', (event) => event.preventDefault());
  byId('note-new').addEventListener('click', () => {
    currentNote = `note-${Date.now()}`;
    byId('note-body').value = '';
    openNote(currentNote, { keepText: true });
    byId('note-status').textContent = 'A new note: it is saved as you type.';
    byId('note-body').focus();
  });
  byId('note-body').addEventListener('input', () => {
    clearTimeout(saveTimer);
    byId('note-status').textContent = 'Unsaved changes…';
    saveTimer = setTimeout(saveNote, AUTOSAVE_MS);
  });
  for (const button of document.querySelectorAll('[data-format]')) button.addEventListener('click', () => downloadTranscript(button.dataset.format));
  byId('session-back').addEventListener('click', (event) => {
    event.preventDefault();
    onLeave();
  });
}

/** Shows the session `id` to its therapist; `back()` returns to the calendar. */
export async function showSession(id, back) {
  if (!wired) wire();
  onLeave = back;
  roomId = id;
  notes = [];
  currentNote = null;
  byId('note-editor').hidden = true;
  byId('note-body').value = '';
  message(null);
  view = await request('GET', sessionPath(roomId));
  renderSummary();
  fillEditForm();
  renderPeople();
  await Promise.all([loadWaiting(), loadLive(), loadNotes(), loadInvoice(), loadFollowup(), loadRecordings(), showBreakouts(roomId, view)]);
  clearInterval(waitingTimer);
  waitingTimer = setInterval(() => { loadWaiting(); loadLive(); }, WAITING_POLL_MS);
  clearInterval(clock);
  clock = setInterval(tick, 1000);
}

/** Stops the page's polling and saves a note being typed. */
export function leaveSession() {
  clearInterval(waitingTimer);
  clearInterval(clock);
  if (saveTimer) {
    clearTimeout(saveTimer);
    saveTimer = null;
    saveNote();
  }
}
