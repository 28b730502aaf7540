//! createRoom: the events a new room starts with (the preset's join rule and guest access, the
//! default power levels, the creator's membership and profile, the client's initial state, name,
//! topic and invites), written as one atomic batch, then its alias and directory listing.

use ruma::{
    OwnedRoomAliasId, OwnedRoomId, OwnedUserId, RoomAliasId, RoomVersionId, UserId,
    api::client::room::{Visibility, create_room::v3::RoomPreset},
};
use serde_json::{Map, Value as JsonValue, json};

use crate::{
    error::{Error, ErrorCode, Result},
    events::{DEFAULT_ROOM_VERSION, PduBuilder},
    host::LocalServer,
};

/// A room as the client asked for it; the JSON fields are objects the client sent as they are.
#[derive(Default)]
pub struct NewRoom {
    pub version: Option<RoomVersionId>,
    pub preset: Option<RoomPreset>,
    pub visibility: Visibility,
    /// The local part of an alias on this server.
    pub alias_localpart: Option<String>,
    pub creation_content: Option<JsonValue>,
    pub power_level_content_override: Option<JsonValue>,
    /// Events with `type`, `state_key` and `content`.
    pub initial_state: Vec<JsonValue>,
    pub name: Option<String>,
    pub topic: Option<String>,
    pub invite: Vec<OwnedUserId>,
    pub is_direct: bool,
}

/// The default power levels, with `admins` at 100.
fn default_power_levels(admins: &[String]) -> JsonValue {
    let users: Map<String, JsonValue> = admins.iter().map(|user| (user.clone(), json!(100))).collect();
    json!({
        "users": users,
        "users_default": 0,
        "events": {
            "m.room.name": 50,
            "m.room.power_levels": 100,
            "m.room.history_visibility": 100,
            "m.room.canonical_alias": 50,
            "m.room.avatar": 50,
            "m.room.tombstone": 100,
            "m.room.server_acl": 100,
            "m.room.encryption": 100,
        },
        "events_default": 0,
        "state_default": 50,
        "ban": 50,
        "kick": 50,
        "redact": 50,
        "invite": 0,
        "historical": 100,
        "notifications": { "room": 50 },
    })
}

fn merge_into(target: &mut JsonValue, overrides: JsonValue) {
    if let (Some(target), JsonValue::Object(overrides)) = (target.as_object_mut(), overrides) {
        for (key, value) in overrides {
            target.insert(key, value);
        }
    }
}

/// Creates the room `creator` asked for. Nothing is written when any part is refused: an alias
/// taken, an unknown local invitee, a malformed initial state event.
pub async fn create(server: &dyn LocalServer, creator: &UserId, room: NewRoom) -> Result<OwnedRoomId> {
    let version = room.version.unwrap_or(DEFAULT_ROOM_VERSION);
    let rules = crate::events::rules_for(&version)?;

    let alias: Option<OwnedRoomAliasId> = match &room.alias_localpart {
        Some(local) => {
            let alias = RoomAliasId::parse(format!("#{local}:{}", server.server_name()))
                .map_err(|e| Error::invalid_param(format!("invalid room alias name: {e}")))?;
            if server.rooms().resolve_alias(&alias)?.is_some() {
                return Err(Error::new(ErrorCode::RoomInUse, "room alias already taken"));
            }
            Some(alias)
        }
        None => None,
    };
    for user in &room.invite {
        if user.server_name() == server.server_name() && !server.users().exists(user)? {
            return Err(Error::not_found(format!("cannot invite unknown user {user}")));
        }
    }

    let preset = room.preset.unwrap_or(match room.visibility {
        Visibility::Public => RoomPreset::PublicChat,
        _ => RoomPreset::PrivateChat,
    });
    let (join_rule, guest_access) = match preset {
        RoomPreset::PublicChat => ("public", "forbidden"),
        _ => ("invite", "can_join"),
    };
    let trusted: Vec<String> =
        if preset == RoomPreset::TrustedPrivateChat { room.invite.iter().map(ToString::to_string).collect() } else { Vec::new() };

    let mut create_content = room.creation_content.unwrap_or_else(|| json!({}));
    if !create_content.is_object() {
        return Err(Error::bad_json("creation_content must be an object"));
    }
    if version == RoomVersionId::V10 {
        create_content["creator"] = json!(creator);
    }
    // Since v12 the creators' power is implied by m.room.create and may not be in power levels;
    // a trusted private chat makes its invitees creators too, as Synapse does.
    let mut power_levels = if rules.authorization.explicitly_privilege_room_creators {
        if !trusted.is_empty() {
            create_content["additional_creators"] = json!(trusted);
        }
        default_power_levels(&[])
    } else {
        default_power_levels(&std::iter::once(creator.to_string()).chain(trusted).collect::<Vec<_>>())
    };
    if let Some(overrides) = room.power_level_content_override {
        merge_into(&mut power_levels, overrides);
    }

    let account = server.users().account(creator)?.ok_or_else(|| Error::forbidden("unknown user"))?;
    let mut events = vec![
        PduBuilder::state("m.room.create", "", create_content),
        PduBuilder::state("m.room.member", creator.as_str(), crate::membership::content("join", None, Some(&account))),
        PduBuilder::state("m.room.power_levels", "", power_levels),
    ];
    if let Some(alias) = &alias {
        events.push(PduBuilder::state("m.room.canonical_alias", "", json!({ "alias": alias })));
    }
    events.push(PduBuilder::state("m.room.join_rules", "", json!({ "join_rule": join_rule })));
    events.push(PduBuilder::state("m.room.history_visibility", "", json!({ "history_visibility": "shared" })));
    events.push(PduBuilder::state("m.room.guest_access", "", json!({ "guest_access": guest_access })));
    for event in room.initial_state {
        let kind = event.get("type").and_then(JsonValue::as_str).ok_or_else(|| Error::bad_json("initial_state event without type"))?;
        if matches!(kind, "m.room.create" | "m.room.member") {
            return Err(Error::bad_json(format!("{kind} cannot be part of initial_state")));
        }
        let state_key = event.get("state_key").and_then(JsonValue::as_str).unwrap_or_default();
        let content = event.get("content").cloned().unwrap_or_else(|| json!({}));
        events.push(PduBuilder::state(kind, state_key, content));
    }
    if let Some(name) = &room.name {
        events.push(PduBuilder::state("m.room.name", "", json!({ "name": name })));
    }
    if let Some(topic) = &room.topic {
        events.push(PduBuilder::state("m.room.topic", "", json!({ "topic": topic })));
    }
    for user in &room.invite {
        let mut content = json!({ "membership": "invite" });
        if room.is_direct {
            content["is_direct"] = json!(true);
        }
        if let Some(invitee) = server.users().account(user)?
            && let Some(name) = invitee.displayname
        {
            content["displayname"] = json!(name);
        }
        events.push(PduBuilder::state("m.room.member", user.as_str(), content));
    }

    // The whole room is one atomic write: a crash never leaves half a room.
    let writer = server.rooms().new_room(version, creator, events).await?;
    let room_id = writer.room_id().clone();
    writer.commit()?;
    if let Some(alias) = &alias {
        server.rooms().set_alias(alias, &room_id, creator)?;
    }
    if room.visibility == Visibility::Public {
        server.rooms().set_public(&room_id, true)?;
    }
    tracing::info!(%room_id, %creator, "created room");
    Ok(room_id)
}
