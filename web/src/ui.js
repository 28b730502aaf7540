// Page switching, screen-reader announcements and small DOM and time helpers.

/** The element with this id; a missing one is a bug in index.html, so fail loudly. */
export function byId(id) {
  const element = document.getElementById(id);
  if (!element) throw new Error(`index.html has no #${id}`);
  return element;
}

/** A new element with attributes (`text` sets textContent: never HTML) and children. */
export function el(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === 'text') element.textContent = value;
    else if (name === 'class') element.className = value;
    else if (name.startsWith('on')) element.addEventListener(name.slice(2), value);
    else element.setAttribute(name, value === true ? '' : value);
  }
  element.append(...children.filter((child) => child !== null && child !== undefined));
  return element;
}

let currentPage = null;

/**
 * Shows one page (a <section data-page>) and hides the others. Focus moves to the page's
 * heading so that keyboard and screen-reader users start reading at the new content.
 */
export function showPage(name) {
  const page = document.querySelector(`[data-page="${name}"]`);
  if (!page) throw new Error(`index.html has no page ${name}`);
  if (currentPage === page) return page;
  for (const section of document.querySelectorAll('[data-page]')) section.hidden = section !== page;
  currentPage = page;
  document.title = `${page.dataset.title ?? page.querySelector('h1')?.textContent ?? 'Join'} · Limbic`;
  page.querySelector('h1')?.focus();
  return page;
}

export function pageShown() {
  return currentPage?.dataset.page ?? null;
}

/** Tells screen readers something without moving focus (polite: after what they are reading). */
export function announce(message, { assertive = false } = {}) {
  const region = byId(assertive ? 'alert' : 'announcer');
  // Clearing first makes a repeated message be read again.
  region.textContent = '';
  setTimeout(() => { region.textContent = message; }, 50);
}

/** Sets a visible status line; also announced when it is a live region in the markup. */
export function setText(id, text) {
  byId(id).textContent = text;
}

export function formatDateTime(ms) {
  return new Intl.DateTimeFormat(undefined, { dateStyle: 'full', timeStyle: 'short' }).format(new Date(ms));
}

export function formatTime(ms) {
  return new Intl.DateTimeFormat(undefined, { timeStyle: 'short' }).format(new Date(ms));
}

/** "1 h 05 min", "4 min 09 s", "12 s": a countdown that reads well aloud too. */
export function formatDuration(ms) {
  const total = Math.max(0, Math.ceil(ms / 1000));
  const hours = Math.floor(total / 3600);
  const minutes = Math.floor((total % 3600) / 60);
  const seconds = total % 60;
  const two = (n) => String(n).padStart(2, '0');
  if (hours > 0) return `${hours} h ${two(minutes)} min`;
  if (minutes > 0) return `${minutes} min ${two(seconds)} s`;
  return `${seconds} s`;
}

/** The localpart of a Matrix user id: a readable name when nobody set a display name. */
export function localpart(userId) {
  return userId.replace(/^@/, '').replace(/:.*$/, '');
}

export function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener('abort', () => { clearTimeout(timer); resolve(); }, { once: true });
  });
}
