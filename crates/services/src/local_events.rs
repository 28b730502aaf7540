//! What a local user may send through the client API beyond the room's rules (the send and
//! state endpoints, and delayed events when they come due): message length, no create or
//! redaction through them, memberships with a membership, canonical aliases that point here.

use ruma::{ServerName, events::TimelineEventType};
use serde_json::Value as JsonValue;

use crate::{
    error::{Error, ErrorCode, Result},
    events::PduBuilder,
    rooms::Rooms,
};

/// Refuses a message whose `body`, or an edit's new body, is longer than `max` characters.
fn check_message_length(content: &JsonValue, max: usize) -> Result<()> {
    let bodies = [content.get("body"), content.get("m.new_content").and_then(|c| c.get("body"))];
    let longest = bodies.into_iter().flatten().filter_map(JsonValue::as_str).map(|b| b.chars().count()).max();
    if longest.is_some_and(|length| length > max) {
        return Err(Error::new(ErrorCode::TooLarge, format!("message body is longer than {max} characters")));
    }
    Ok(())
}

/// What the checks need: the rooms (for aliases), this server's name and the clinic's limit on a
/// message's length. `Server::local_events` makes one.
pub struct LocalEvents<'a> {
    pub rooms: &'a Rooms,
    pub server_name: &'a ServerName,
    pub max_message_length: usize,
}

impl LocalEvents<'_> {
    /// Checks an event a local user asks to send, now or delayed, as the send and state
    /// endpoints do beyond the room's rules, and builds it.
    pub fn builder(&self, room_id: &ruma::RoomId, kind: &str, state_key: Option<&str>, content: JsonValue) -> Result<PduBuilder> {
        event_builder(self, room_id, kind, state_key, content)
    }
}

fn event_builder(rules: &LocalEvents<'_>, room_id: &ruma::RoomId, kind: &str, state_key: Option<&str>, content: JsonValue) -> Result<PduBuilder> {
    let Some(state_key) = state_key else {
        let kind = TimelineEventType::from(kind);
        if kind == TimelineEventType::RoomRedaction || kind == TimelineEventType::RoomCreate {
            return Err(Error::bad_json("use the dedicated endpoint for this event type"));
        }
        if kind == TimelineEventType::RoomMessage {
            check_message_length(&content, rules.max_message_length)?;
        }
        return Ok(PduBuilder::message(kind, content));
    };
    if kind == "m.room.create" {
        return Err(Error::forbidden("m.room.create cannot be sent after the room exists"));
    }
    if kind == "m.room.member" {
        // Membership changes are validated like the dedicated endpoints.
        let target: ruma::OwnedUserId = state_key.try_into().map_err(|_| Error::bad_json("state_key of m.room.member must be a user id"))?;
        if content.get("membership").and_then(JsonValue::as_str).is_none() {
            return Err(Error::bad_json(format!("m.room.member for {target} needs a membership")));
        }
    }
    if kind == "m.room.canonical_alias" {
        validate_canonical_alias(rules, room_id, &content)?;
    }
    Ok(PduBuilder::state(kind, state_key, content))
}

/// Aliases in `m.room.canonical_alias` must exist and point at this room.
fn validate_canonical_alias(rules: &LocalEvents<'_>, room_id: &ruma::RoomId, content: &JsonValue) -> Result<()> {
    let mut aliases: Vec<&str> = content.get("alias").and_then(JsonValue::as_str).into_iter().collect();
    if let Some(alt) = content.get("alt_aliases").and_then(JsonValue::as_array) {
        aliases.extend(alt.iter().filter_map(JsonValue::as_str));
    }
    for alias in aliases {
        let alias: &ruma::RoomAliasId = alias.try_into().map_err(|_| Error::new(ErrorCode::InvalidParam, format!("{alias} is not a valid alias")))?;
        if alias.server_name() == rules.server_name && rules.rooms.resolve_alias(alias)?.as_deref() != Some(room_id) {
            return Err(Error::new(ErrorCode::BadAlias, format!("{alias} does not point to this room")));
        }
    }
    Ok(())
}
