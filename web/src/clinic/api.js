// The server's APIs as the console uses them: password sign-in, the access token kept in this
// tab's sessionStorage (never in a URL), and requests whose refusals become ApiErrors.

const STORAGE_KEY = 'limbic.clinic.session';

/** A refusal: the HTTP status and the Matrix error (`errcode`, `error`). */
export class ApiError extends Error {
  constructor(status, errcode, message) {
    super(message || `the server answered HTTP ${status}`);
    this.status = status;
    this.errcode = errcode ?? null;
  }
}

/** The signed-in session of this tab: `{access_token, user_id, device_id}`, or null. */
export function currentSession() {
  try {
    const stored = JSON.parse(sessionStorage.getItem(STORAGE_KEY) ?? 'null');
    return stored?.access_token && stored?.user_id ? stored : null;
  } catch {
    return null;
  }
}

function forget() {
  sessionStorage.removeItem(STORAGE_KEY);
}

/** Called when the server no longer knows the token (signed out elsewhere, deactivated). */
let onSignedOut = () => {};
export function whenSignedOut(handler) {
  onSignedOut = handler;
}

/**
 * `method path` with the session's token and a JSON body; the answer. `query` is an object of
 * parameters. Refusals throw ApiError; a network failure throws ApiError with status 0.
 */
async function send(method, path, { body, query, token = currentSession()?.access_token } = {}) {
  const url = new URL(path, location.origin);
  for (const [name, value] of Object.entries(query ?? {})) url.searchParams.set(name, String(value));
  const headers = {};
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  let response;
  try {
    response = await fetch(url, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch {
    throw new ApiError(0, null, 'The server cannot be reached. Check your connection and try again.');
  }
  if (response.ok) return response;
  let answer = {};
  try {
    answer = JSON.parse(await response.text());
  } catch {
    answer = {};
  }
  if (response.status === 401 && token && answer.errcode === 'M_UNKNOWN_TOKEN') {
    forget();
    onSignedOut();
  }
  throw new ApiError(response.status, answer.errcode, answer.error);
}

/** A request whose answer is JSON (an empty answer reads as `{}`). */
export async function request(method, path, options) {
  const text = await (await send(method, path, options)).text();
  return text ? JSON.parse(text) : {};
}

/** A file of the media repository (`mxc://server/id`), as a Blob, with the session's token. */
export async function mediaBlob(mxc) {
  const [, server, id] = /^mxc:\/\/([^/]+)\/(.+)$/.exec(mxc) ?? [];
  if (!server) throw new ApiError(400, null, `not a media address: ${mxc}`);
  return (await send('GET', `/_matrix/client/v1/media/download/${encodeURIComponent(server)}/${encodeURIComponent(id)}`)).blob();
}

/** A request whose answer is text (a transcript). */
export async function requestText(method, path, options) {
  return (await send(method, path, options)).text();
}

/** Password sign-in with a user name or a full user id. */
export async function signIn(user, password) {
  const answer = await request('POST', '/_matrix/client/v3/login', {
    token: null,
    body: {
      type: 'm.login.password',
      identifier: { type: 'm.id.user', user },
      password,
      initial_device_display_name: 'Limbic clinic console',
    },
  });
  const session = { access_token: answer.access_token, user_id: answer.user_id, device_id: answer.device_id };
  sessionStorage.setItem(STORAGE_KEY, JSON.stringify(session));
  return session;
}

/** Ends the session on the server (the device goes) and in this tab. */
export async function signOut() {
  try {
    await request('POST', '/_matrix/client/v3/logout', { body: {} });
  } finally {
    forget();
  }
}

export const me = () => request('GET', '/_limbic/client/v1/me');

/** The caller's sessions overlapping [from, to) (Dates). */
export async function sessionsBetween(from, to) {
  const answer = await request('GET', '/_limbic/client/v1/sessions', { query: { from: from.valueOf(), to: to.valueOf() } });
  return answer.sessions;
}

export const createSession = (session) => request('POST', '/_limbic/client/v1/sessions', { body: session });

/** Users of the directory matching `term` (those the privacy settings let the caller find). */
export async function searchUsers(term) {
  const answer = await request('POST', '/_matrix/client/v3/user_directory/search', { body: { search_term: term, limit: 10 } });
  return answer.results;
}

const sessionPath = (roomId) => `/_limbic/client/v1/sessions/${encodeURIComponent(roomId)}`;
export { sessionPath };
