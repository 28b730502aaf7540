// A client's page: their upcoming sessions with a countdown to the join window and "Join" (the
// join page takes over: waiting room, passcode where one is set, the call), and their past ones.

import { byId, el } from '../ui.js';
import { openInJoinPage } from '../handoff.js';
import { currentSession, sessionsBetween } from './api.js';
import { followupOf, invoices, renderFollowup, renderInvoice } from './plugins.js';
import { formatInstant, formatTime, localTimeZone, until } from './time.js';

const DAY = 24 * 3_600_000;
// Together within the 400 days one request may span.
const PAST_DAYS = 90;
const AHEAD_DAYS = 300;
const LIVE = new Set(['scheduled', 'open', 'in_progress']);
const STATUS_NAMES = {
  scheduled: 'Scheduled', open: 'Open', in_progress: 'In progress', completed: 'Completed', cancelled: 'Cancelled', no_show: 'No-show',
};

let ticker = null;

function when(session) {
  const here = `${formatInstant(session.starts_at)} – ${formatTime(session.ends_at)}`;
  return session.timezone === localTimeZone() ? here : `${here} (scheduled in ${session.timezone.replaceAll('_', ' ')})`;
}

function upcomingItem(view) {
  const { session } = view;
  const id = `countdown-${view.room_id.replace(/[^A-Za-z0-9]/g, '')}`;
  const countdown = el('p', { id, class: 'countdown', 'data-testid': 'countdown' });
  const join = el('button', {
    type: 'button', class: 'button', text: 'Join', 'aria-describedby': id, 'data-testid': 'join-session',
    onclick: () => openInJoinPage(currentSession(), view.room_id),
  });
  const update = (now) => {
    const opensAt = view.join_window.opens_at;
    const open = LIVE.has(session.status) && now >= opensAt && now < session.ends_at;
    join.disabled = !open;
    countdown.textContent = open ? 'The join window is open: you can join now.' : `You can join in ${until(opensAt - now)}.`;
  };
  update(Date.now());
  return { item: el('li', { class: 'session-item', 'data-room': view.room_id },
    el('h3', { text: session.title }),
    el('p', { text: when(session) }),
    el('p', { class: 'hint', text: `${STATUS_NAMES[session.status] ?? session.status} · opens ${view.join_window.opens_at < session.starts_at ? `${Math.round((session.starts_at - view.join_window.opens_at) / 60_000)} minutes before the start` : 'at the start'}` }),
    countdown,
    join), update };
}

function pastItem(view) {
  const { session } = view;
  const item = el('li', { class: 'session-item', 'data-room': view.room_id },
    el('h3', { text: session.title }),
    el('p', { text: when(session) }),
    el('p', { class: 'hint', text: STATUS_NAMES[session.status] ?? session.status }));
  // A completed group session may have a follow-up chat (the followup plugin's).
  if (session.status === 'completed') {
    followupOf(view.room_id).then((room) => { if (room) item.append(renderFollowup(session.title, room)); }).catch(() => {});
  }
  return item;
}

/** Loads and shows the signed-in person's sessions; the countdowns tick every second. */
export async function showClientSessions() {
  clearInterval(ticker);
  const status = byId('sessions-status');
  status.textContent = 'Loading your sessions…';
  const now = Date.now();
  let sessions;
  try {
    sessions = await sessionsBetween(new Date(now - PAST_DAYS * DAY), new Date(now + AHEAD_DAYS * DAY));
  } catch (error) {
    status.textContent = `Your sessions could not be loaded: ${error.message}`;
    return;
  }
  const upcoming = sessions.filter((view) => LIVE.has(view.session.status) && view.session.ends_at > now);
  const past = sessions.filter((view) => !upcoming.includes(view)).reverse();
  const items = upcoming.map(upcomingItem);
  byId('upcoming-list').replaceChildren(...items.map((entry) => entry.item));
  byId('past-list').replaceChildren(...past.map(pastItem));
  byId('upcoming-empty').hidden = upcoming.length > 0;
  byId('past-empty').hidden = past.length > 0;
  byId('therapist-hint').hidden = sessions.length > 0;
  status.textContent = '';
  showInvoices();
  ticker = setInterval(() => {
    const tick = Date.now();
    for (const entry of items) entry.update(tick);
  }, 1000);
}

/** Stops the countdowns (another page is shown). */
export function leaveClientSessions() {
  clearInterval(ticker);
}

/** The client's invoices, when the server bills sessions. */
async function showInvoices() {
  try {
    const list = await invoices();
    byId('invoices').hidden = list === null;
    if (list === null) return;
    byId('invoices-list').replaceChildren(...list.slice().reverse().map((invoice) => el('li', { class: 'session-item' },
      el('h3', { text: invoice.title }), renderInvoice(invoice))));
    byId('invoices-empty').hidden = list.length > 0;
  } catch (error) {
    byId('invoices').hidden = false;
    byId('invoices-empty').hidden = false;
    byId('invoices-empty').textContent = `Your invoices could not be loaded: ${error.message}.`;
  }
}
