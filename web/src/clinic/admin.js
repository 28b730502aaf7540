// The clinic admin's page: users and verifying therapists, the audit log (filtered by actor or
// subject, action, room and time; the chain verified on request) and the plugins' state.

import { byId, el } from '../ui.js';
import { request } from './api.js';
import { formatStamp } from './time.js';

const PAGE = 50;
const enc = encodeURIComponent;

function status(id, text) {
  byId(id).textContent = text;
}

// --- users and therapists ------------------------------------------------------------------

async function therapistButton(user) {
  const { verified } = await request('GET', `/_limbic/admin/v1/therapists/${enc(user.name)}`);
  const cell = el('td', {});
  const render = (isVerified) => {
    const label = isVerified ? 'Verified' : 'Not verified';
    const action = isVerified ? 'Un-verify' : 'Verify';
    cell.replaceChildren(
      el('span', { class: isVerified ? 'tag tag-ok' : 'tag', text: label, 'data-testid': 'therapist-state' }), ' ',
      el('button', {
        type: 'button', class: 'button button-small button-secondary', text: action, 'aria-label': `${action} ${user.name} as a therapist`,
        'data-testid': 'therapist-toggle',
        onclick: async (event) => {
          event.target.disabled = true;
          try {
            const answer = await request('PUT', `/_limbic/admin/v1/therapists/${enc(user.name)}`, { body: { verified: !isVerified } });
            render(answer.verified);
            status('users-status', `${user.name} is ${answer.verified ? 'now a verified therapist' : 'no longer a verified therapist'}.`);
            cell.querySelector('button')?.focus();
          } catch (error) {
            event.target.disabled = false;
            status('users-status', `${user.name} could not be changed: ${error.message}.`);
          }
        },
      }),
    );
  };
  render(verified);
  return cell;
}

let usersTerm = '';
let usersNext = null;

let usersLoad = 0;

async function loadUsers(term = usersTerm, { more = false } = {}) {
  usersTerm = term;
  // A newer load (another search) wins over one still under way.
  const load = ++usersLoad;
  if (!more) byId('users-rows').replaceChildren();
  status('users-status', 'Loading users…');
  try {
    const query = { limit: PAGE };
    if (term) query.name = term;
    if (more && usersNext !== null) query.from = usersNext;
    const answer = await request('GET', '/_synapse/admin/v2/users', { query });
    const rows = await Promise.all(answer.users.map(async (user) => el('tr', { 'data-user': user.name },
      el('td', {}, el('span', { class: 'mono', text: user.name }), user.displayname ? el('div', { class: 'hint', text: user.displayname }) : null),
      el('td', { text: [user.admin ? 'Admin' : null, user.deactivated ? 'Deactivated' : 'Active'].filter(Boolean).join(', ') }),
      user.deactivated ? el('td', { class: 'hint', text: '—' }) : await therapistButton(user),
    )));
    if (load !== usersLoad) return;
    byId('users-rows').append(...rows);
    usersNext = answer.next_token ?? null;
    byId('users-more').hidden = usersNext === null;
    const shown = byId('users-rows').childElementCount;
    status('users-status', `${shown} of ${answer.total} user${answer.total === 1 ? '' : 's'} shown.`);
  } catch (error) {
    status('users-status', `The users could not be loaded: ${error.message}.`);
  }
}

// --- the audit log -------------------------------------------------------------------------

let auditQuery = {};
let auditNext = null;

function auditFilter() {
  const query = {};
  const text = (id) => byId(id).value.trim();
  if (text('audit-user')) query.user = text('audit-user');
  if (text('audit-action')) query.action = text('audit-action');
  if (text('audit-room')) query.room_id = text('audit-room');
  if (byId('audit-from').value) query.from_ts = new Date(byId('audit-from').value).valueOf();
  if (byId('audit-to').value) query.to_ts = new Date(byId('audit-to').value).valueOf();
  return query;
}

const auditRow = (entry) => el('tr', {},
  el('td', { text: String(entry.seq) }),
  el('td', { text: formatStamp(entry.ts) }),
  el('td', { class: 'mono', text: entry.action }),
  el('td', { class: 'mono', text: entry.actor ?? '—' }),
  el('td', { class: 'mono', text: entry.target ?? '—' }),
  el('td', { class: 'mono', text: entry.room_id ?? '—' }),
);

async function loadAudit({ more = false } = {}) {
  if (!more) {
    auditQuery = auditFilter();
    byId('audit-rows').replaceChildren();
  }
  status('audit-status', 'Loading entries…');
  try {
    const query = { ...auditQuery, limit: PAGE };
    if (more && auditNext !== null) query.from = auditNext;
    const answer = await request('GET', '/_limbic/admin/v1/audit', { query });
    byId('audit-rows').append(...answer.entries.map(auditRow));
    auditNext = answer.next_token ?? null;
    byId('audit-more').hidden = auditNext === null;
    const shown = byId('audit-rows').childElementCount;
    status('audit-status', shown ? `${shown} entr${shown === 1 ? 'y' : 'ies'} shown, oldest first.` : 'No entries match.');
  } catch (error) {
    status('audit-status', `The audit log could not be loaded: ${error.message}.`);
  }
}

async function verifyChain() {
  const notice = byId('audit-verification');
  notice.hidden = false;
  notice.className = 'notice';
  notice.textContent = 'Verifying every entry of the chain…';
  try {
    const result = await request('GET', '/_limbic/admin/v1/audit/verify');
    if (result.valid) {
      notice.textContent = `The chain is intact: all ${result.entries} entries check out.`;
      notice.className = 'notice notice-ok';
    } else {
      notice.textContent = `The chain is broken at entry ${result.first_invalid}: ${result.reason}. Entries from there on cannot be trusted.`;
      notice.className = 'notice notice-error';
    }
  } catch (error) {
    notice.textContent = `The chain could not be verified: ${error.message}.`;
    notice.className = 'notice notice-error';
  }
}

// --- plugins -------------------------------------------------------------------------------

async function loadPlugins() {
  try {
    const { plugins } = await request('GET', '/_limbic/admin/v1/plugins');
    byId('plugins-list').replaceChildren(...plugins.map((plugin) => el('li', { class: 'plugin' },
      el('h3', { text: `${plugin.name} ${plugin.version}` }),
      el('p', { text: plugin.description }),
      el('p', {},
        el('span', { class: plugin.enabled ? 'tag tag-ok' : 'tag tag-error', text: plugin.enabled ? 'Running' : 'Turned off' }),
        ` acts as `, el('span', { class: 'mono', text: plugin.user_id }),
        `; restarted ${plugin.restarts} time${plugin.restarts === 1 ? '' : 's'}.`),
      el('p', { class: 'hint', text: `Capabilities: ${plugin.capabilities.join(', ') || 'none'}` }),
      plugin.last_error ? el('p', { class: 'notice notice-error', text: `Last error: ${plugin.last_error}` }) : null,
    )));
    status('plugins-status', plugins.length ? '' : 'No plugins are loaded.');
  } catch (error) {
    status('plugins-status', `The plugins' state could not be loaded: ${error.message}.`);
  }
}

let wired = false;

/** Fills the admin page (wiring its controls the first time). */
export function showAdmin() {
  if (!wired) {
    wired = true;
    byId('users-search').addEventListener('submit', (event) => {
      event.preventDefault();
      loadUsers(byId('users-term').value.trim());
    });
    byId('audit-filter').addEventListener('submit', (event) => {
      event.preventDefault();
      loadAudit();
    });
    byId('audit-more').addEventListener('click', () => loadAudit({ more: true }));
    byId('users-more').addEventListener('click', () => loadUsers(usersTerm, { more: true }));
    byId('audit-verify').addEventListener('click', verifyChain);
  }
  byId('audit-verification').hidden = true;
  return Promise.all([loadUsers(byId('users-term').value.trim()), loadAudit(), loadPlugins()]);
}
