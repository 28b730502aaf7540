// How the join page keeps its sign-in for a tab, and how the clinic console hands a signed-in
// user to it: the console writes the sign-in and the session's room here, then opens /join,
// which finds no link token and goes on with what is stored (as after a reload).

export const JOIN_STORAGE_KEY = 'limbic.join';

/** Opens the join page for `roomId` as the console's signed-in user (same tab, same storage). */
export function openInJoinPage({ user_id: userId, access_token: accessToken, device_id: deviceId }, roomId) {
  sessionStorage.setItem(JOIN_STORAGE_KEY, JSON.stringify({ userId, accessToken, deviceId, roomId, jti: null, knocked: false }));
  location.assign('/join');
}
