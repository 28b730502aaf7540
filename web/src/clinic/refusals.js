// What the clinic's refusals of a session's time, title, limit or participants mean for the
// person filling in a form: the field they concern, and a sentence to show there.

import { currentSession } from './api.js';

/** `{field, message}`: `field` is `title`, `time`, `limit`, `clients` or null (the whole form). */
export function describeRefusal(error, action = 'schedule the session') {
  const message = error.message;
  if (error.status === 409) {
    const [, who, other] = /^(\S+) is already booked for "(.*)" at that time/.exec(message) ?? [];
    if (!other) return { field: 'time', message: `That time is taken: ${message}.` };
    const whose = who === currentSession()?.user_id ? 'You already have' : `${who} already has`;
    return { field: 'time', message: `${whose} "${other}" at that time. Choose another time.` };
  }
  if (/title/i.test(message)) return { field: 'title', message: 'Give the session a title.' };
  if (/end after it starts/i.test(message)) return { field: 'time', message: 'The session must end after it starts.' };
  if (/participants|full/i.test(message)) return { field: 'limit', message: `Too many participants: ${message}.` };
  if (error.status === 404 && /unknown user/i.test(message)) return { field: 'clients', message: `${message}: pick people from the list.` };
  if (error.status === 403 && /verified/i.test(message)) {
    return { field: null, message: `You may not ${action}: ${message}. Ask your clinic's administrator to verify your account.` };
  }
  if (error.status === 0) return { field: null, message };
  return { field: null, message: `Could not ${action}: ${message}.` };
}
