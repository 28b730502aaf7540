// What the console shows of the first-party plugins, when the server runs them: invoices from
// billing (`/_limbic/plugins/billing`) and the calendar feed (`/_limbic/plugins/calendar`). A
// server without a plugin answers 404 there, and the console leaves that part out.

import { el } from '../ui.js';
import { ApiError, request } from './api.js';
import { formatInstant } from './time.js';

const BILLING = '/_limbic/plugins/billing';
const CALENDAR = '/_limbic/plugins/calendar';
const FOLLOWUP = '/_limbic/plugins/followup';

/** The server answers this way when it does not run the plugin. */
const notRunning = (error) => error instanceof ApiError && error.status === 404 && /no plugin/.test(error.message);

/** The caller's invoices (as billing lets them see them), or null without the plugin. */
export async function invoices() {
  try {
    return (await request('GET', `${BILLING}/invoices`)).invoices;
  } catch (error) {
    if (notRunning(error)) return null;
    throw error;
  }
}

/** A session's invoice; null when there is none yet; undefined without the plugin. */
export async function invoiceOf(roomId) {
  try {
    return await request('GET', `${BILLING}/invoices/${encodeURIComponent(roomId)}`);
  } catch (error) {
    if (notRunning(error)) return undefined;
    if (error instanceof ApiError && error.status === 404) return null;
    throw error;
  }
}

export function money(cents, currency) {
  return new Intl.NumberFormat(undefined, { style: 'currency', currency }).format(cents / 100);
}

/** An invoice as a list of its lines and its total. */
export function renderInvoice(invoice) {
  return el('div', { class: 'invoice' },
    el('p', { text: `${formatInstant(invoice.started_at)} · ${invoice.duration_minutes} minute${invoice.duration_minutes === 1 ? '' : 's'}` }),
    el('ul', { class: 'invoice-lines' }, ...invoice.lines.map((line) => el('li', {},
      el('span', { class: 'mono', text: line.user_id }),
      ` · ${line.attended ? 'attended' : 'did not attend'} · ${line.quantity} ${line.unit}${line.quantity === 1 ? '' : 's'} × ${money(line.unit_price_cents, invoice.currency)} = `,
      el('strong', { text: money(line.amount_cents, invoice.currency) })))),
    el('p', {}, 'Total: ', el('strong', { text: money(invoice.total_cents, invoice.currency), 'data-testid': 'invoice-total' })));
}

/** The caller's calendar feed address (absolute), or null without the plugin. */
export async function feedUrl() {
  try {
    const { url } = await request('GET', `${CALENDAR}/feed-url`);
    return new URL(url, location.origin).href;
  } catch (error) {
    if (notRunning(error)) return null;
    throw error;
  }
}

/** The follow-up chat of a completed group session; null when there is none (yet); undefined
 *  without the plugin. */
export async function followupOf(roomId) {
  try {
    return (await request('GET', `${FOLLOWUP}/rooms/${encodeURIComponent(roomId)}`)).room_id;
  } catch (error) {
    if (notRunning(error)) return undefined;
    if (error instanceof ApiError && error.status === 404) return null;
    throw error;
  }
}

/** Where a person finds the follow-up chat: their Matrix app, where it is among their rooms. */
export function renderFollowup(title, followupRoom) {
  return el('p', { 'data-testid': 'followup' },
    'The follow-up chat “', el('strong', { text: `${title} — follow-up` }),
    '” is open to everyone who took part: find it among your rooms in your Matrix app (Element, for example). Its address: ',
    el('span', { class: 'mono', text: followupRoom }));
}
