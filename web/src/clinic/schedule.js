// Scheduling a session: the dialog's fields, clients picked from the user directory, an
// optional six-digit passcode shown once, and the clinic's refusals at the field they concern.

import { byId, el } from '../ui.js';
import { ApiError, createSession, searchUsers } from './api.js';
import { copy } from './copy.js';
import { describeRefusal } from './refusals.js';
import { formatInstant, localDateAndTime, timeZones, zonedToInstant } from './time.js';

const DURATIONS = [30, 45, 50, 60, 75, 90, 120, 150, 180];
const DEFAULT_DURATION = 50;

const dialog = () => byId('schedule');
let chosen = new Map(); // user id -> display name
let onScheduled = () => {};

/** A passcode of six random digits. */
function newPasscode() {
  const digits = new Uint32Array(6);
  crypto.getRandomValues(digits);
  return Array.from(digits, (d) => String(d % 10)).join('');
}

function fieldError(id, message) {
  const error = byId(`${id}-error`);
  error.textContent = message ?? '';
  error.hidden = !message;
  const input = document.querySelector(`[aria-describedby~="${id}-error"]`);
  if (input) input.setAttribute('aria-invalid', message ? 'true' : 'false');
  return input;
}

function clearErrors() {
  for (const id of ['schedule-title', 'schedule-clients', 'schedule-time', 'schedule-limit']) fieldError(id, null);
  byId('schedule-error').hidden = true;
}

function renderChosen() {
  const list = byId('schedule-clients');
  list.replaceChildren(
    ...[...chosen].map(([userId, name]) =>
      el('li', { class: 'chosen-item' },
        el('span', { text: name && name !== userId ? `${name} (${userId})` : userId }),
        el('button', {
          type: 'button', class: 'button-link', text: 'Remove', 'aria-label': `Remove ${name || userId}`,
          onclick: () => { chosen.delete(userId); renderChosen(); byId('schedule-client-search').focus(); },
        }))),
  );
}

let searchTimer = null;
let searchSeq = 0;
async function search(term) {
  const results = byId('schedule-client-results');
  const seq = ++searchSeq;
  if (term.trim().length < 2) {
    results.replaceChildren();
    return;
  }
  try {
    const users = await searchUsers(term.trim());
    if (seq !== searchSeq) return;
    const options = users.filter((user) => !chosen.has(user.user_id));
    results.replaceChildren(
      ...(options.length ? options.map((user) => el('li', {},
        el('button', {
          type: 'button', class: 'choice', 'data-user': user.user_id,
          text: user.display_name ? `${user.display_name} (${user.user_id})` : user.user_id,
          onclick: () => {
            chosen.set(user.user_id, user.display_name ?? user.user_id);
            renderChosen();
            results.replaceChildren();
            const input = byId('schedule-client-search');
            input.value = '';
            input.focus();
          },
        }))) : [el('li', { class: 'hint', text: 'Nobody found.' })]),
    );
  } catch (error) {
    if (seq === searchSeq) results.replaceChildren(el('li', { class: 'field-error', text: error.message }));
  }
}

/** The offered duration nearest to `minutes`. */
const nearestDuration = (minutes) => DURATIONS.reduce((best, d) => (Math.abs(d - minutes) < Math.abs(best - minutes) ? d : best));

/** Opens the dialog for a new session, at `start` (a Date) if given, as long as up to `end`. */
export function openSchedule({ start, end } = {}) {
  // A click on the calendar may report both a date click and a selection.
  if (dialog().open) return;
  const form = byId('schedule-form');
  form.reset();
  chosen = new Map();
  renderChosen();
  byId('schedule-client-results').replaceChildren();
  clearErrors();
  const when = start ?? nextQuarterHour();
  const { date, time } = localDateAndTime(when);
  byId('schedule-date').value = date;
  byId('schedule-time').value = time;
  byId('schedule-duration').value = String(start && end ? nearestDuration((end - start) / 60_000) : DEFAULT_DURATION);
  byId('schedule-window').value = '15';
  dialog().showModal();
  byId('schedule-title').focus();
}

function nextQuarterHour() {
  const now = new Date();
  now.setMinutes(Math.ceil((now.getMinutes() + 1) / 15) * 15, 0, 0);
  return now;
}

function readForm() {
  const zone = byId('schedule-timezone').value;
  const startsAt = zonedToInstant(byId('schedule-date').value, byId('schedule-time').value, zone);
  const minutes = Number(byId('schedule-duration').value);
  const limit = byId('schedule-limit').value.trim();
  const window = byId('schedule-window').value.trim();
  const passcode = byId('schedule-passcode').checked ? newPasscode() : null;
  const session = {
    kind: byId('schedule-kind').value,
    title: byId('schedule-title').value.trim(),
    starts_at: startsAt,
    ends_at: startsAt + minutes * 60_000,
    timezone: zone,
    participants: [...chosen.keys()].map((userId) => ({ user_id: userId, role: 'client' })),
    recording_policy: byId('schedule-recording').value,
    join_window_minutes: window === '' ? 15 : Number(window),
  };
  if (limit !== '') session.max_participants = Number(limit);
  if (passcode) session.passcode = passcode;
  return session;
}

/** What the form can tell before asking the server. */
function checkLocally() {
  if (!byId('schedule-title').value.trim()) return ['schedule-title', 'Give the session a title.'];
  if (!byId('schedule-date').value || !byId('schedule-time').value) return ['schedule-time', 'Choose a date and a start time.'];
  const limit = byId('schedule-limit').value.trim();
  if (limit !== '' && !(Number.isInteger(Number(limit)) && Number(limit) >= 1)) return ['schedule-limit', 'The limit is a whole number, at least 1.'];
  return null;
}

async function submit(event) {
  event.preventDefault();
  clearErrors();
  const local = checkLocally();
  if (local) {
    fieldError(local[0], local[1])?.focus();
    return;
  }
  const request = readForm();
  const button = byId('schedule-submit');
  button.disabled = true;
  button.textContent = 'Scheduling…';
  try {
    const created = await createSession(request);
    dialog().close();
    showScheduled(created, request.passcode ?? null);
    onScheduled(created);
  } catch (error) {
    if (!(error instanceof ApiError)) throw error;
    const { field, message } = describeRefusal(error);
    if (field) {
      fieldError(`schedule-${field}`, message)?.focus();
    } else {
      const notice = byId('schedule-error');
      notice.textContent = message;
      notice.hidden = false;
    }
  } finally {
    button.disabled = false;
    button.textContent = 'Schedule';
  }
}

function showScheduled(created, passcode) {
  const { session, room_id: roomId } = created;
  const link = `${location.origin}/clinic/sessions/${encodeURIComponent(roomId)}`;
  const details = byId('scheduled-details');
  details.replaceChildren(
    el('dt', { text: 'Session' }), el('dd', { text: session.title }),
    el('dt', { text: 'When' }), el('dd', { text: `${formatInstant(session.starts_at, session.timezone)} (${session.timezone})` }),
    el('dt', { text: 'Link' }), el('dd', { class: 'mono', text: link, 'data-testid': 'scheduled-link' }),
  );
  byId('scheduled-passcode').hidden = !passcode;
  byId('scheduled-passcode-value').textContent = passcode ?? '';
  byId('scheduled-copy').textContent = passcode ? 'Copy link and passcode' : 'Copy link';
  byId('scheduled-copied').textContent = '';
  const text = [`${session.title}, ${formatInstant(session.starts_at, session.timezone)} (${session.timezone})`, link, passcode ? `Passcode: ${passcode}` : null]
    .filter(Boolean).join('\n');
  byId('scheduled-copy').onclick = () => copy(text, byId('scheduled-copied'), passcode ? 'the link and the passcode above' : 'the link above');
  byId('scheduled').showModal();
}

/** Wires the dialogs once; `scheduled(created)` runs after each new session. */
export function setUpScheduling(scheduled) {
  onScheduled = scheduled;
  byId('schedule-duration').replaceChildren(
    ...DURATIONS.map((minutes) => el('option', { value: String(minutes), text: minutes < 60 || minutes % 60 ? `${minutes} minutes` : `${minutes / 60} hour${minutes > 60 ? 's' : ''}` })),
  );
  byId('schedule-timezone').replaceChildren(...timeZones().map((zone) => el('option', { value: zone, text: zone.replaceAll('_', ' ') })));
  byId('schedule-form').addEventListener('submit', (event) => { submit(event); });
  byId('schedule-cancel').addEventListener('click', () => dialog().close());
  byId('schedule-client-search').addEventListener('input', (event) => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(() => search(event.target.value), 250);
  });
  byId('scheduled-close').addEventListener('click', () => {
    // The passcode is never shown again.
    byId('scheduled-passcode-value').textContent = '';
    byId('scheduled').close();
  });
  byId('scheduled').addEventListener('close', () => { byId('scheduled-passcode-value').textContent = ''; });
}
