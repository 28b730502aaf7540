//! Membership changes a local user makes (join, invite, leave, kick, ban, knock): the member
//! event, with the target's profile where they enter the room, through the local send path.

use ruma::{OwnedEventId, RoomId, UserId};
use serde_json::{Map, Value as JsonValue, json};

use crate::{
    error::{Error, Result},
    events::PduBuilder,
    host::LocalServer,
    users::Account,
};

/// A member event's content: the membership, a reason if given, and for a user entering the
/// room (join, invite, knock) the display name and avatar they have set.
pub fn content(membership: &str, reason: Option<&str>, profile: Option<&Account>) -> JsonValue {
    let mut content = Map::new();
    content.insert("membership".to_owned(), json!(membership));
    if let Some(reason) = reason {
        content.insert("reason".to_owned(), json!(reason));
    }
    if let Some(account) = profile.filter(|_| matches!(membership, "join" | "invite" | "knock")) {
        for (field, value) in [("displayname", &account.displayname), ("avatar_url", &account.avatar_url)] {
            if let Some(value) = value {
                content.insert(field.to_owned(), json!(value));
            }
        }
    }
    JsonValue::Object(content)
}

/// Sends `sender`'s change of `target`'s membership. A local target must have an active
/// account. The passcode rides in the content until the clinic's `prepare` checks it and takes
/// it out: it is never stored in the event.
pub async fn set(
    server: &dyn LocalServer,
    sender: &UserId,
    room_id: &RoomId,
    target: &UserId,
    membership: &str,
    reason: Option<&str>,
    passcode: Option<&str>,
) -> Result<OwnedEventId> {
    if !server.rooms().exists(room_id)? {
        return Err(Error::not_found("unknown room"));
    }
    let account = if target.server_name() == server.server_name() {
        let account = server.users().account(target)?.filter(|a| !a.deactivated);
        Some(account.ok_or_else(|| Error::not_found(format!("unknown user {target}")))?)
    } else {
        None
    };
    let mut content = content(membership, reason, account.as_ref());
    if let Some(passcode) = passcode {
        content[limbic_clinic_model::PASSCODE_FIELD] = json!(passcode);
    }
    let event = server.send_local_event(sender, room_id, PduBuilder::state("m.room.member", target.as_str(), content)).await?;
    Ok(event.event_id)
}
