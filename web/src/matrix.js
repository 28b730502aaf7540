// The slice of the Matrix client-server API (and Limbic's session API) the join page uses,
// over fetch against the server that served the page. No SDK: the page needs a dozen calls.

import { localpart, sleep } from './ui.js';

const CLIENT = '/_matrix/client/v3';
const SESSIONS = '/_limbic/client/v1/sessions';

/** An error answer from the server, with the Matrix errcode and the body's extra fields. */
export class MatrixError extends Error {
  constructor(status, body) {
    super(body?.error || `the server answered HTTP ${status}`);
    this.status = status;
    this.errcode = body?.errcode ?? null;
    this.body = body ?? {};
  }
}

async function fetchJson(method, path, { body, accessToken, signal } = {}) {
  const headers = {};
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  if (accessToken) headers.Authorization = `Bearer ${accessToken}`;
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    signal,
    cache: 'no-store',
  });
  const text = await response.text();
  let json = null;
  try { json = text ? JSON.parse(text) : {}; } catch { json = null; }
  if (!response.ok) throw new MatrixError(response.status, json);
  return json ?? {};
}

const enc = encodeURIComponent;

/** Reads the claims of a JWT without checking it (the server checks; the page only needs the room). */
export function jwtClaims(token) {
  const parts = String(token).split('.');
  if (parts.length !== 3) return null;
  try {
    const base64 = parts[1].replace(/-/g, '+').replace(/_/g, '/');
    const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
    return JSON.parse(new TextDecoder().decode(bytes));
  } catch {
    return null;
  }
}

/** Signs in with an appointment link's token (`org.matrix.login.jwt`, spec/appointments.md). */
export async function loginWithLink(token) {
  const answer = await fetchJson('POST', `${CLIENT}/login`, {
    body: { type: 'org.matrix.login.jwt', token, initial_device_display_name: 'Limbic join page' },
  });
  return {
    userId: answer.user_id,
    accessToken: answer.access_token,
    deviceId: answer.device_id,
    roomId: answer['org.limbic.room_id'],
  };
}

const PASSCODE_FIELD = 'org.limbic.passcode';

function withPasscode(body, passcode) {
  return passcode ? { ...body, [PASSCODE_FIELD]: passcode } : body;
}

/** A refusal because the session needs its passcode, or another one than was given. */
export function needsPasscode(error) {
  return error instanceof MatrixError && error.status === 403 && /passcode/i.test(error.message);
}

/** A signed-in user's requests. */
export class Matrix {
  constructor({ userId, accessToken, deviceId }) {
    this.userId = userId;
    this.accessToken = accessToken;
    this.deviceId = deviceId;
  }

  request(method, path, body, signal) {
    return fetchJson(method, path, { body, accessToken: this.accessToken, signal });
  }

  session(roomId) { return this.request('GET', `${SESSIONS}/${enc(roomId)}`); }
  setStatus(roomId, status) { return this.request('PUT', `${SESSIONS}/${enc(roomId)}/status`, { status }); }
  waiting(roomId) { return this.request('GET', `${SESSIONS}/${enc(roomId)}/waiting`); }
  admit(roomId, userId) { return this.request('POST', `${SESSIONS}/${enc(roomId)}/waiting/${enc(userId)}/admit`, {}); }
  decline(roomId, userId) { return this.request('POST', `${SESSIONS}/${enc(roomId)}/waiting/${enc(userId)}/decline`, {}); }
  setRecording(roomId, recording) { return this.request('PUT', `${SESSIONS}/${enc(roomId)}/recording`, { recording }); }

  // A passcode-protected session takes its passcode in the knock's or join's body.
  join(roomId, passcode) { return this.request('POST', `${CLIENT}/join/${enc(roomId)}`, withPasscode({}, passcode)); }
  knock(roomId, reason, passcode) { return this.request('POST', `${CLIENT}/knock/${enc(roomId)}`, withPasscode({ reason }, passcode)); }
  leave(roomId, reason) { return this.request('POST', `${CLIENT}/rooms/${enc(roomId)}/leave`, { reason }); }

  async displayName(userId) {
    try {
      const profile = await this.request('GET', `${CLIENT}/profile/${enc(userId)}`);
      return profile.displayname || localpart(userId);
    } catch {
      return localpart(userId);
    }
  }

  sendText(roomId, body) {
    const txnId = `join.${Date.now()}.${Math.random().toString(36).slice(2)}`;
    return this.request('PUT', `${CLIENT}/rooms/${enc(roomId)}/send/m.room.message/${enc(txnId)}`, { msgtype: 'm.text', body });
  }

  putState(roomId, type, stateKey, content) {
    return this.request('PUT', `${CLIENT}/rooms/${enc(roomId)}/state/${enc(type)}/${enc(stateKey)}`, content);
  }

  /** An OpenID token for the call token service (spec/calls.md). */
  openIdToken() {
    return this.request('POST', `${CLIENT}/user/${enc(this.userId)}/openid/request_token`, {});
  }

  /** A LiveKit call token for the room's call, as MatrixRTC clients get one (MSC4195). */
  callToken(roomId, openIdToken) {
    return this.request('POST', '/_limbic/calls/get_token', {
      room_id: roomId,
      slot_id: 'm.call#ROOM',
      openid_token: openIdToken,
      member: { id: this.deviceId, claimed_user_id: this.userId, claimed_device_id: this.deviceId },
    });
  }
}

/**
 * The session room as this user sees it through /sync: their own membership, the room's state
 * (members, recording, consent, raised hands, the session) and new messages. One long-poll
 * loop for the whole page; listeners are told of each change.
 */
export class RoomSync {
  constructor(matrix, roomId) {
    this.matrix = matrix;
    this.roomId = roomId;
    this.state = new Map(); // "type\u0000stateKey" -> {content, sender}
    this.membership = null; // this user's: join, invite, knock, leave, ban, or null (none yet)
    this.membershipSender = null;
    this.listeners = { membership: [], state: [], message: [], error: [] };
    this.abort = new AbortController();
    this.filter = JSON.stringify({
      room: {
        rooms: [roomId],
        include_leave: true,
        timeline: { limit: 50 },
        ephemeral: { types: [] },
        account_data: { types: [] },
      },
      presence: { types: [] },
      account_data: { types: [] },
    });
    this.first = null;
  }

  /** Adds a listener; returns what removes it. */
  on(kind, listener) {
    this.listeners[kind].push(listener);
    return () => { this.listeners[kind] = this.listeners[kind].filter((l) => l !== listener); };
  }

  stateContent(type, stateKey = '') { return this.state.get(`${type}\u0000${stateKey}`)?.content ?? null; }

  joinedMembers() {
    const members = [];
    for (const [key, { content }] of this.state) {
      const [type, stateKey] = key.split('\u0000');
      if (type === 'm.room.member' && content.membership === 'join') members.push(stateKey);
    }
    return members;
  }

  nameOf(userId) {
    return this.stateContent('m.room.member', userId)?.displayname || localpart(userId);
  }

  /** Starts the loop; resolves once the first (immediate) sync has been applied. */
  start() {
    this.first ??= new Promise((resolve, reject) => { this.loop(resolve, reject); });
    return this.first;
  }

  stop() { this.abort.abort(); }

  async loop(firstDone, firstFailed) {
    let since = null;
    let backoff = 1000;
    while (!this.abort.signal.aborted) {
      const query = new URLSearchParams({ filter: this.filter, timeout: since ? '10000' : '0' });
      if (since) query.set('since', since);
      try {
        const answer = await this.matrix.request('GET', `${CLIENT}/sync?${query}`, undefined, this.abort.signal);
        this.apply(answer, since === null);
        since = answer.next_batch;
        backoff = 1000;
        firstDone();
      } catch (error) {
        if (this.abort.signal.aborted) return;
        // A revoked sign-in will not come back, and without a first sync the page has nothing
        // to show: give up and let the page say why.
        if (error instanceof MatrixError && (error.status === 401 || since === null)) {
          firstFailed(error);
          this.listeners.error.forEach((listener) => listener(error));
          return;
        }
        await sleep(backoff, this.abort.signal);
        backoff = Math.min(backoff * 2, 10000);
      }
    }
  }

  apply(answer, initial) {
    const rooms = answer.rooms ?? {};
    const joined = rooms.join?.[this.roomId];
    const invited = rooms.invite?.[this.roomId];
    const knocked = rooms.knock?.[this.roomId];
    const left = rooms.leave?.[this.roomId];
    if (joined) {
      for (const event of joined.state?.events ?? []) this.applyState(event);
      for (const event of joined.timeline?.events ?? []) {
        if (event.state_key !== undefined) this.applyState(event);
        else if (event.type === 'm.room.message') this.listeners.message.forEach((listener) => listener(event, initial));
      }
      this.setMembership('join', this.state.get(`m.room.member\u0000${this.matrix.userId}`)?.sender);
    } else if (invited) {
      this.setMembership('invite', this.ownStrippedEvent(invited.invite_state)?.sender);
    } else if (knocked) {
      this.setMembership('knock', this.matrix.userId);
    } else if (left) {
      const events = [...(left.state?.events ?? []), ...(left.timeline?.events ?? [])];
      const own = events.filter((e) => e.type === 'm.room.member' && e.state_key === this.matrix.userId).at(-1);
      this.setMembership(own?.content?.membership ?? 'leave', own?.sender ?? null);
    }
  }

  ownStrippedEvent(stripped) {
    return (stripped?.events ?? []).find((e) => e.type === 'm.room.member' && e.state_key === this.matrix.userId);
  }

  applyState(event) {
    this.state.set(`${event.type}\u0000${event.state_key}`, { content: event.content ?? {}, sender: event.sender });
    this.listeners.state.forEach((listener) => listener(event));
  }

  setMembership(membership, sender) {
    if (membership === this.membership) return;
    this.membership = membership;
    this.membershipSender = sender;
    this.listeners.membership.forEach((listener) => listener(membership, sender));
  }

  /**
   * Records a membership this page just set (a knock, a leave) before /sync reports it, so that
   * whatever the server does next, even before the next sync, is seen as a change.
   */
  assume(membership, sender) {
    this.setMembership(membership, sender);
  }

  /** Resolves with the first membership (this one included) that `wanted` accepts. */
  waitForMembership(wanted) {
    if (wanted(this.membership)) return Promise.resolve(this.membership);
    return new Promise((resolve, reject) => {
      const offs = [
        this.on('membership', (membership) => { if (wanted(membership)) { offs.forEach((off) => off()); resolve(membership); } }),
        this.on('error', (error) => { offs.forEach((off) => off()); reject(error); }),
      ];
    });
  }
}
