//! Rooms: read state and members (capability `rooms.read`), send events (`rooms.send`), create
//! rooms (`rooms.create`) and invite (`rooms.invite`).
//!
//! Where a function takes a `sender`, `None` acts as the plugin's own user
//! ([`plugin_user`](crate::plugin_user)) and `Some(user_id)` as that local user, which needs the
//! capability `users.act-as` as well. Whatever a plugin sends passes the room's auth rules, the
//! clinic policy and the plugins' `check-event` like any client's event; a refusal comes back as
//! [`Error::Refused`] with the Matrix error. Writes fail with [`Error::NotAllowed`] during
//! `check-event`.

use serde::Serialize;

use crate::{Error, Event, Member, RoomSpec, bindings::limbic::plugin::host};

/// The room's current state event of this type and state key, if there is one.
pub fn state_event(room_id: &str, event_type: &str, state_key: &str) -> Result<Option<Event>, Error> {
    Ok(host::state_event(room_id, event_type, state_key)?)
}

/// The room's whole current state.
pub fn room_state(room_id: &str) -> Result<Vec<Event>, Error> {
    Ok(host::room_state(room_id)?)
}

/// The room's members, with their membership (`join`, `invite`, `knock`, `leave` or `ban`).
pub fn members(room_id: &str) -> Result<Vec<Member>, Error> {
    Ok(host::room_members(room_id)?)
}

/// Sends an event whose content is JSON text (an object): a state event when `state_key` is
/// given. Returns its event id. [`send_event`], [`send_state`] and [`send_text`] serialize the
/// content for you.
pub fn send_raw(
    room_id: &str,
    sender: Option<&str>,
    event_type: &str,
    state_key: Option<&str>,
    content: &str,
) -> Result<String, Error> {
    Ok(host::send_event(room_id, sender, event_type, state_key, content)?)
}

/// Sends a message-like (non-state) event with `content` serialized to JSON; returns its event
/// id.
pub fn send_event<T: Serialize + ?Sized>(
    room_id: &str,
    sender: Option<&str>,
    event_type: &str,
    content: &T,
) -> Result<String, Error> {
    send_raw(room_id, sender, event_type, None, &serde_json::to_string(content).map_err(Error::json)?)
}

/// Sends a state event with this state key and `content` serialized to JSON; returns its event
/// id.
pub fn send_state<T: Serialize + ?Sized>(
    room_id: &str,
    sender: Option<&str>,
    event_type: &str,
    state_key: &str,
    content: &T,
) -> Result<String, Error> {
    send_raw(room_id, sender, event_type, Some(state_key), &serde_json::to_string(content).map_err(Error::json)?)
}

/// Sends an `m.room.message` of msgtype `m.text` with this body; returns its event id.
pub fn send_text(room_id: &str, sender: Option<&str>, body: &str) -> Result<String, Error> {
    send_event(room_id, sender, "m.room.message", &serde_json::json!({ "msgtype": "m.text", "body": body }))
}

/// Creates a room with `creator` (`None`: the plugin's user) as its creator and returns its id.
/// The creator gets power level 100, the users in `spec.power_levels` theirs; the users in
/// `spec.invite` are invited once the room exists.
pub fn create_room(creator: Option<&str>, spec: &RoomSpec) -> Result<String, Error> {
    Ok(host::create_room(creator, spec)?)
}

/// Invites `user_id` to the room, as `sender` (`None`: the plugin's user).
pub fn invite(room_id: &str, sender: Option<&str>, user_id: &str) -> Result<(), Error> {
    Ok(host::invite(room_id, sender, user_id)?)
}
