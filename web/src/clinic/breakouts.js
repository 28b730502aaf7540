// Breakout rooms of a group session (family, group, workshop, support) on its page: create,
// assign participants (drag a name to a room, or choose from the list under it: the keyboard's
// way), close.

import { byId, el } from '../ui.js';
import { request, sessionPath } from './api.js';

const GROUP_KINDS = new Set(['family', 'group', 'workshop', 'support']);
const MAIN = '';

let roomId = null;
let participants = []; // user ids with a role other than therapist

async function act(method, path, body, what) {
  const error = byId('breakouts-error');
  error.hidden = true;
  try {
    await request(method, `${sessionPath(roomId)}/breakouts${path}`, { body });
  } catch (failure) {
    error.textContent = `${what} failed: ${failure.message}.`;
    error.hidden = false;
  }
  await load();
}

/** Moves `userId` to the breakout `to` (MAIN: back to the main room) from `from`. */
function move(userId, from, to) {
  if (from === to) return;
  const enc = encodeURIComponent;
  if (to === MAIN) return act('DELETE', `/${enc(from)}/participants/${enc(userId)}`, undefined, `Bringing ${userId} back`);
  return act('PUT', `/${enc(to)}/participants/${enc(userId)}`, {}, `Moving ${userId}`);
}

function column(id, title, members, open, closeButton) {
  const list = el('ul', { class: 'breakout-members' });
  const node = el('section', { class: 'breakout-column', 'data-breakout': id || 'main', 'aria-label': title },
    el('h3', { text: title }), list, closeButton);
  node.addEventListener('dragover', (event) => { event.preventDefault(); node.classList.add('drop-target'); });
  node.addEventListener('dragleave', () => node.classList.remove('drop-target'));
  node.addEventListener('drop', (event) => {
    event.preventDefault();
    node.classList.remove('drop-target');
    const [userId, from] = JSON.parse(event.dataTransfer.getData('application/json'));
    move(userId, from, id);
  });
  for (const userId of members) {
    const where = el('select', { 'aria-label': `Where ${userId} is` },
      ...open.map(({ id: option, name }) => el('option', { value: option, text: name, selected: option === id })));
    where.addEventListener('change', () => move(userId, id, where.value));
    const chip = el('li', { class: 'chip', draggable: 'true', 'data-user': userId }, el('span', { class: 'mono', text: userId }), where);
    chip.addEventListener('dragstart', (event) => {
      event.dataTransfer.setData('application/json', JSON.stringify([userId, id]));
      event.dataTransfer.effectAllowed = 'move';
    });
    list.append(chip);
  }
  if (!members.length) list.append(el('li', { class: 'hint', text: 'Nobody' }));
  return node;
}

async function load() {
  let breakouts;
  try {
    ({ breakouts } = await request('GET', `${sessionPath(roomId)}/breakouts`));
  } catch (failure) {
    byId('breakouts-error').textContent = `The breakout rooms could not be loaded: ${failure.message}.`;
    byId('breakouts-error').hidden = false;
    return;
  }
  const open = breakouts.filter((b) => !b.closed);
  const placed = new Set(open.flatMap((b) => b.members));
  const destinations = [{ id: MAIN, name: 'Main room' }, ...open.map((b) => ({ id: b.room_id, name: b.name }))];
  byId('breakout-board').replaceChildren(
    column(MAIN, 'Main room', participants.filter((user) => !placed.has(user)), destinations, null),
    ...open.map((b) => column(b.room_id, b.name, b.members.filter((user) => participants.includes(user)), destinations,
      el('button', {
        type: 'button', class: 'button button-small button-secondary', text: 'Close', 'aria-label': `Close ${b.name}`, 'data-testid': 'breakout-close',
        onclick: () => act('DELETE', `/${encodeURIComponent(b.room_id)}`, undefined, `Closing ${b.name}`),
      }))),
  );
  const closed = breakouts.filter((b) => b.closed).map((b) => b.name);
  byId('breakouts-closed').textContent = closed.length ? `Closed: ${closed.join(', ')}.` : '';
}

let wired = false;

/** Shows the breakout rooms of a group session (hidden for other kinds). */
export function showBreakouts(id, view) {
  const section = byId('breakouts');
  section.hidden = !GROUP_KINDS.has(view.session.kind);
  if (section.hidden) return Promise.resolve();
  if (!wired) {
    wired = true;
    byId('breakout-new').addEventListener('submit', (event) => {
      event.preventDefault();
      const name = byId('breakout-name').value.trim();
      if (!name) return;
      byId('breakout-name').value = '';
      act('POST', '', { name }, `Creating ${name}`);
    });
  }
  roomId = id;
  participants = Object.entries(view.roles).filter(([, role]) => role !== 'therapist' && role !== 'co_therapist').map(([user]) => user);
  return load();
}
