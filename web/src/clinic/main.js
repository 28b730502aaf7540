// The clinic console: sign in with an account of this server, then the view that fits who signed
// in. A verified therapist gets their calendar and schedules sessions from it; a clinic admin
// gets the administration page (both, with a switch, for someone who is both); anyone else sees
// their sessions as a client, with a countdown and "Join".

import { Calendar } from '@fullcalendar/core';
import dayGridPlugin from '@fullcalendar/daygrid';
import interactionPlugin from '@fullcalendar/interaction';
import listPlugin from '@fullcalendar/list';
import timeGridPlugin from '@fullcalendar/timegrid';

import { byId, el } from '../ui.js';
import { ApiError, currentSession, me, sessionsBetween, signIn, signOut, whenSignedOut } from './api.js';
import { showAdmin } from './admin.js';
import { copy } from './copy.js';
import { leaveClientSessions, showClientSessions } from './client.js';
import { openSchedule, setUpScheduling } from './schedule.js';
import { feedUrl } from './plugins.js';
import { leaveSession, showSession } from './session.js';
import { formatInstant, localTimeZone } from './time.js';

const GROUP_KINDS = new Set(['group', 'workshop', 'support', 'family']);
const STATUS_NAMES = {
  scheduled: 'Scheduled', open: 'Open', in_progress: 'In progress', completed: 'Completed', cancelled: 'Cancelled', no_show: 'No-show',
};

let currentPage = null;

/** Shows one page; focus moves to its heading, where keyboard and screen-reader users start. */
function showPage(name) {
  const page = document.querySelector(`[data-page="${name}"]`);
  if (currentPage === page) return;
  for (const section of document.querySelectorAll('[data-page]')) section.hidden = section !== page;
  currentPage = page;
  document.title = `${page.dataset.title ?? 'Clinic'} · Limbic`;
  page.querySelector('h1')?.focus();
}

function announce(message) {
  const region = byId('announcer');
  region.textContent = '';
  setTimeout(() => { region.textContent = message; }, 50);
}

// --- signing in and out --------------------------------------------------------------------

function showSignIn(message) {
  byId('signed-in-as').hidden = true;
  byId('sign-out').hidden = true;
  const error = byId('sign-in-error');
  error.textContent = message ?? '';
  error.hidden = !message;
  showPage('sign-in');
}

async function onSignIn(event) {
  event.preventDefault();
  const user = byId('sign-in-user').value.trim();
  const password = byId('sign-in-password').value;
  const error = byId('sign-in-error');
  if (!user || !password) {
    error.textContent = 'Enter your username and your password.';
    error.hidden = false;
    return;
  }
  const button = event.submitter ?? document.querySelector('[data-testid="sign-in-submit"]');
  button.disabled = true;
  try {
    await signIn(user, password);
    byId('sign-in-password').value = '';
    error.hidden = true;
    await enter();
  } catch (failure) {
    if (!(failure instanceof ApiError)) throw failure;
    error.textContent = failure.status === 403 || failure.errcode === 'M_FORBIDDEN'
      ? 'That username and password do not match an account here.'
      : failure.status === 429 ? 'Too many attempts. Wait a minute, then try again.' : failure.message;
    error.hidden = false;
    byId('sign-in-password').focus();
  } finally {
    button.disabled = false;
  }
}

// --- who signed in -------------------------------------------------------------------------

/** Who is signed in, to the clinic (`GET /me`). */
let standing = null;

async function enter() {
  try {
    standing = await me();
  } catch (failure) {
    if (failure instanceof ApiError && failure.status === 401) return showSignIn();
    throw failure;
  }
  const label = byId('signed-in-as');
  label.textContent = standing.displayname ? `${standing.displayname} (${standing.user_id})` : standing.user_id;
  label.hidden = false;
  byId('sign-out').hidden = false;
  const views = { calendar: standing.verified_therapist, admin: standing.admin };
  for (const button of document.querySelectorAll('[data-view]')) button.hidden = !views[button.dataset.view];
  byId('views').hidden = !(views.calendar && views.admin);
  const linked = sessionInPath();
  if (views.calendar && linked) return openSession(linked, { push: false });
  if (views.calendar) return showView('calendar');
  if (views.admin) return showView('admin');
  showPage('sessions');
  return showClientSessions();
}

/** One of the signed-in person's views; the top bar marks it as the current one. */
function showView(name) {
  for (const button of document.querySelectorAll('[data-view]')) {
    if (button.dataset.view === name) button.setAttribute('aria-current', 'page');
    else button.removeAttribute('aria-current');
  }
  if (name === 'calendar') return showCalendar();
  showPage('admin');
  return showAdmin();
}

// --- the therapist's calendar --------------------------------------------------------------

let calendar = null;

function eventOf(view) {
  const { session } = view;
  return {
    id: view.room_id,
    title: session.title,
    start: session.starts_at,
    end: session.ends_at,
    // A link: keyboard users reach and open it like any other (a click is handled in place).
    url: `/clinic/sessions/${encodeURIComponent(view.room_id)}`,
    classNames: [GROUP_KINDS.has(session.kind) ? 'kind-group' : 'kind-individual', `status-${session.status.replace('_', '-')}`],
    extendedProps: { view },
  };
}

const SESSION_PATH = /^\/clinic\/sessions\/([^/]+)$/;

/** The session a path names (`/clinic/sessions/<room id>`), if any. */
function sessionInPath(path = location.pathname) {
  const match = SESSION_PATH.exec(path);
  return match ? decodeURIComponent(match[1]) : null;
}

/** A therapist's session page, at its own address (a link, the browser's back button). */
async function openSession(roomId, { push = true } = {}) {
  if (push) history.pushState(null, '', `/clinic/sessions/${encodeURIComponent(roomId)}`);
  showPage('session');
  try {
    await showSession(roomId, backToCalendar);
  } catch (failure) {
    byId('session-title').textContent = 'This session cannot be shown';
    const notice = byId('session-message');
    notice.textContent = failure.status === 404 ? 'It does not exist, or you are not one of its therapists.' : failure.message;
    notice.className = 'notice notice-error';
    notice.hidden = false;
  }
}

function backToCalendar({ push = true } = {}) {
  leaveSession();
  if (push) history.pushState(null, '', '/clinic');
  showView('calendar');
}

function showCalendar() {
  showPage('calendar');
  byId('calendar-timezone').textContent = localTimeZone().replaceAll('_', ' ');
  if (calendar) {
    calendar.refetchEvents();
    return;
  }
  showFeed();
  const narrow = window.matchMedia('(max-width: 640px)').matches;
  calendar = new Calendar(byId('calendar'), {
    plugins: [dayGridPlugin, timeGridPlugin, listPlugin, interactionPlugin],
    initialView: narrow ? 'listWeek' : 'timeGridWeek',
    headerToolbar: narrow
      ? { left: 'prev,next', center: 'title', right: 'today' }
      : { left: 'prev,next today', center: 'title', right: 'dayGridMonth,timeGridWeek,timeGridDay,listWeek' },
    footerToolbar: narrow ? { center: 'dayGridMonth,timeGridWeek,timeGridDay,listWeek' } : false,
    // Words, not icon glyphs: FullCalendar's icons are images without a text alternative.
    buttonIcons: false,
    buttonText: { prev: 'Previous', next: 'Next', today: 'Today', month: 'Month', week: 'Week', day: 'Day', list: 'Agenda' },
    nowIndicator: true,
    selectable: true,
    selectMirror: true,
    // A click is a date click (one slot); only a drag of a few pixels selects a range.
    selectMinDistance: 5,
    // The dialog's own clicks must not end the selection it was opened for; it ends when the
    // dialog closes.
    unselectAuto: false,
    height: 'auto',
    // The day headers scroll with the grid: a sticky header overlapped the events below it.
    stickyHeaderDates: false,
    scrollTime: '08:00:00',
    slotMinTime: '06:00:00',
    slotMaxTime: '22:00:00',
    allDaySlot: false,
    noEventsText: 'No sessions in this period.',
    eventTimeFormat: { hour: '2-digit', minute: '2-digit' },
    events: async (range) => {
      try {
        const sessions = await sessionsBetween(range.start, range.end);
        byId('calendar-error').hidden = true;
        return sessions.map(eventOf);
      } catch (failure) {
        const notice = byId('calendar-error');
        notice.textContent = `Your sessions could not be loaded: ${failure.message}`;
        notice.hidden = false;
        return [];
      }
    },
    // The selection shows the time being scheduled until the dialog closes.
    select: (selection) => openSchedule({ start: selection.start, end: selection.end }),
    dateClick: (click) => {
      // A click on a time starts there; on a day of the month view, at 9:00 that day.
      const start = new Date(click.date);
      if (click.view.type === 'dayGridMonth') start.setHours(9, 0, 0, 0);
      openSchedule({ start });
    },
    eventClick: (click) => {
      click.jsEvent.preventDefault();
      openSession(click.event.id);
    },
    eventDidMount: (info) => {
      // The mirror of a selection being dragged is an event too, with no session behind it.
      if (!info.event.extendedProps.view) return;
      const { session } = info.event.extendedProps.view;
      info.el.setAttribute('aria-label', `${session.title}, ${STATUS_NAMES[session.status] ?? session.status}, ${formatInstant(session.starts_at)}`);
    },
  });
  calendar.render();
}

/** The calendar plugin's feed of the therapist's sessions, to subscribe to in a calendar app. */
async function showFeed() {
  try {
    const url = await feedUrl();
    byId('feed').hidden = url === null;
    if (url === null) return;
    byId('feed-url').textContent = url;
    byId('feed-subscribe').href = url.replace(/^https?:/, 'webcal:');
    byId('feed-copy').onclick = () => copy(url, byId('feed-status'), 'the address above');
  } catch (failure) {
    byId('feed').hidden = false;
    byId('feed-status').textContent = `The feed could not be loaded: ${failure.message}.`;
  }
}

// --- start ---------------------------------------------------------------------------------

function start() {
  byId('sign-in-form').addEventListener('submit', (event) => { onSignIn(event); });
  byId('sign-out').addEventListener('click', async () => {
    try {
      await signOut();
    } finally {
      calendar?.destroy();
      calendar = null;
      leaveClientSessions();
      leaveSession();
      byId('views').hidden = true;
      standing = null;
      showSignIn();
      announce('You are signed out.');
    }
  });
  for (const button of document.querySelectorAll('[data-view]')) button.addEventListener('click', () => showView(button.dataset.view));
  byId('new-session').addEventListener('click', () => openSchedule());
  byId('schedule').addEventListener('close', () => calendar?.unselect());
  window.addEventListener('popstate', () => {
    if (!standing?.verified_therapist) return;
    const roomId = sessionInPath();
    if (roomId) openSession(roomId, { push: false });
    else backToCalendar({ push: false });
  });
  setUpScheduling((created) => {
    calendar?.refetchEvents();
    announce(`${created.session.title} is scheduled.`);
  });
  whenSignedOut(() => showSignIn('You were signed out. Sign in again to continue.'));
  if (currentSession()) {
    enter().catch((failure) => showSignIn(failure.message));
  } else {
    showSignIn();
  }
}

start();
