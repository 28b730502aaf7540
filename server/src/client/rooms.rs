//! Room creation and room-level reads: createRoom, /joined_rooms, /members, /joined_members.

use axum::{Json, Router, extract::State};
use ruma::{
    OwnedRoomAliasId, RoomAliasId,
    api::client::{
        membership::{get_member_events, joined_members, joined_rooms},
        room::{Visibility, create_room},
    },
};
use serde_json::{Value as JsonValue, json};

use super::{AppState, Ruma, RumaResponse, account::strip_nulls, events::{client_event, read_view}, route};
use crate::{
    error::{Error, ErrorCode, Result},
    events::{DEFAULT_ROOM_VERSION, PduBuilder},
    ratelimit::Action,
    rooms::{Membership, ReadView},
};

pub(super) fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = route::<create_room::v3::Request, _, _>(router, create_room_handler);
    let router = route::<joined_rooms::v3::Request, _, _>(router, joined_rooms_handler);
    let router = route::<get_member_events::v3::Request, _, _>(router, members_handler);
    route::<joined_members::v3::Request, _, _>(router, joined_members_handler)
}

/// The default power levels, with `admins` at 100.
fn default_power_levels(admins: &[String]) -> JsonValue {
    let users: serde_json::Map<String, JsonValue> = admins.iter().map(|user| (user.clone(), json!(100))).collect();
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

async fn create_room_handler(
    State(server): State<AppState>,
    req: Ruma<create_room::v3::Request>,
) -> Result<RumaResponse<create_room::v3::Response>> {
    let caller = req.caller();
    server.rate_limiter.check(Action::CreateRoom, &req.rate_keys())?;
    let body = &req.body;
    let creator = caller.user_id.clone();
    let version = body.room_version.clone().unwrap_or(DEFAULT_ROOM_VERSION);
    let rules = crate::events::rules_for(&version)?;

    let alias: Option<OwnedRoomAliasId> = match &body.room_alias_name {
        Some(local) => {
            let alias = RoomAliasId::parse(format!("#{local}:{}", server.server_name()))
                .map_err(|e| Error::invalid_param(format!("invalid room alias name: {e}")))?;
            if server.rooms.resolve_alias(&alias)?.is_some() {
                return Err(Error::new(ErrorCode::RoomInUse, "room alias already taken"));
            }
            Some(alias)
        }
        None => None,
    };
    for user in &body.invite {
        if user.server_name() == server.server_name() && !server.users.exists(user)? {
            return Err(Error::not_found(format!("cannot invite unknown user {user}")));
        }
    }

    let preset = body.preset.clone().unwrap_or(match body.visibility {
        Visibility::Public => create_room::v3::RoomPreset::PublicChat,
        _ => create_room::v3::RoomPreset::PrivateChat,
    });
    let (join_rule, guest_access) = match preset {
        create_room::v3::RoomPreset::PublicChat => ("public", "forbidden"),
        _ => ("invite", "can_join"),
    };
    let trusted: Vec<String> = if preset == create_room::v3::RoomPreset::TrustedPrivateChat {
        body.invite.iter().map(ToString::to_string).collect()
    } else {
        Vec::new()
    };

    let mut create_content = match &body.creation_content {
        Some(raw) => serde_json::from_str::<JsonValue>(raw.json().get()).map_err(|e| Error::bad_json(e.to_string()))?,
        None => json!({}),
    };
    if !create_content.is_object() {
        return Err(Error::bad_json("creation_content must be an object"));
    }
    if version == ruma::RoomVersionId::V10 {
        create_content["creator"] = json!(creator);
    }
    // Since v12 the creators' power is implied by m.room.create and may not be in power levels;
    // a trusted private chat makes its invitees creators too, as Synapse does.
    let creators_privileged = rules.authorization.explicitly_privilege_room_creators;
    let mut power_levels = if creators_privileged {
        if !trusted.is_empty() {
            create_content["additional_creators"] = json!(trusted);
        }
        default_power_levels(&[])
    } else {
        default_power_levels(&std::iter::once(creator.to_string()).chain(trusted).collect::<Vec<_>>())
    };
    if let Some(raw) = &body.power_level_content_override {
        let overrides: JsonValue = serde_json::from_str(raw.json().get()).map_err(|e| Error::bad_json(e.to_string()))?;
        merge_into(&mut power_levels, overrides);
    }

    let account = server.users.account(&creator)?.ok_or_else(|| Error::forbidden("unknown user"))?;
    let mut member = json!({
        "membership": "join",
        "displayname": account.displayname,
        "avatar_url": account.avatar_url,
    });
    strip_nulls(&mut member);

    let mut events = vec![
        PduBuilder::state("m.room.create", "", create_content),
        PduBuilder::state("m.room.member", creator.as_str(), member),
        PduBuilder::state("m.room.power_levels", "", power_levels),
    ];
    if let Some(alias) = &alias {
        events.push(PduBuilder::state("m.room.canonical_alias", "", json!({ "alias": alias })));
    }
    events.push(PduBuilder::state("m.room.join_rules", "", json!({ "join_rule": join_rule })));
    events.push(PduBuilder::state("m.room.history_visibility", "", json!({ "history_visibility": "shared" })));
    events.push(PduBuilder::state("m.room.guest_access", "", json!({ "guest_access": guest_access })));
    for raw in &body.initial_state {
        let event: JsonValue = serde_json::from_str(raw.json().get()).map_err(|e| Error::bad_json(e.to_string()))?;
        let kind = event.get("type").and_then(JsonValue::as_str).ok_or_else(|| Error::bad_json("initial_state event without type"))?;
        if matches!(kind, "m.room.create" | "m.room.member") {
            return Err(Error::bad_json(format!("{kind} cannot be part of initial_state")));
        }
        let state_key = event.get("state_key").and_then(JsonValue::as_str).unwrap_or_default();
        let content = event.get("content").cloned().unwrap_or_else(|| json!({}));
        events.push(PduBuilder::state(kind, state_key, content));
    }
    if let Some(name) = &body.name {
        events.push(PduBuilder::state("m.room.name", "", json!({ "name": name })));
    }
    if let Some(topic) = &body.topic {
        events.push(PduBuilder::state("m.room.topic", "", json!({ "topic": topic })));
    }
    for user in &body.invite {
        let mut content = json!({ "membership": "invite" });
        if body.is_direct {
            content["is_direct"] = json!(true);
        }
        if let Some(invitee) = server.users.account(user)?
            && let Some(name) = invitee.displayname
        {
            content["displayname"] = json!(name);
        }
        events.push(PduBuilder::state("m.room.member", user.as_str(), content));
    }

    // The whole room is one atomic write: a crash never leaves half a room.
    let writer = server.rooms.new_room(version, &creator, events).await?;
    let room_id = writer.room_id().clone();
    writer.commit()?;
    if let Some(alias) = &alias {
        server.rooms.set_alias(alias, &room_id, &creator)?;
    }
    if body.visibility == Visibility::Public {
        server.rooms.set_public(&room_id, true)?;
    }
    tracing::info!(%room_id, %creator, "created room");
    Ok(create_room::v3::Response::new(room_id).into())
}

async fn joined_rooms_handler(
    State(server): State<AppState>,
    req: Ruma<joined_rooms::v3::Request>,
) -> Result<RumaResponse<joined_rooms::v3::Response>> {
    let rooms = server
        .rooms
        .user_rooms(&req.caller().user_id)?
        .into_iter()
        .filter(|(_, entry)| entry.membership == Membership::Join)
        .map(|(room, _)| room)
        .collect();
    Ok(joined_rooms::v3::Response::new(rooms).into())
}

async fn members_handler(
    State(server): State<AppState>,
    req: Ruma<get_member_events::v3::Request>,
) -> Result<Json<JsonValue>> {
    let caller = req.caller();
    let room_id = &req.body.room_id;
    let snapshot = match read_view(&server, room_id, &caller.user_id)? {
        ReadView::Current => server.rooms.room(room_id)?.ok_or_else(|| Error::not_found("unknown room"))?.snapshot,
        ReadView::AsOfLeave { snapshot, .. } => snapshot,
    };
    let membership_filter = req.body.membership.as_ref().map(|m| m.to_string());
    let not_membership = req.body.not_membership.as_ref().map(|m| m.to_string());
    let members = server.rooms.state_events(snapshot, |kind, _| kind == "m.room.member")?;
    let chunk: Vec<JsonValue> = members
        .iter()
        .filter(|pdu| {
            let membership = pdu.membership().map(Membership::as_str);
            membership_filter.as_deref().is_none_or(|m| membership == Some(m))
                && not_membership.as_deref().is_none_or(|m| membership != Some(m))
        })
        .map(|pdu| {
            let meta = server.rooms.meta(&pdu.event_id).ok().flatten();
            client_event(&server, pdu, meta.as_ref(), Some(caller), true)
        })
        .collect();
    Ok(Json(json!({ "chunk": chunk })))
}

async fn joined_members_handler(
    State(server): State<AppState>,
    req: Ruma<joined_members::v3::Request>,
) -> Result<Json<JsonValue>> {
    let caller = req.caller();
    let room_id = &req.body.room_id;
    if !server.rooms.is_joined(room_id, &caller.user_id)? {
        return Err(Error::forbidden("you are not a member of this room"));
    }
    let mut joined = serde_json::Map::new();
    for user in server.rooms.joined_members(room_id)? {
        let content = server.rooms.state_content(room_id, "m.room.member", user.as_str())?.unwrap_or_default();
        let mut profile = json!({
            "display_name": content.get("displayname"),
            "avatar_url": content.get("avatar_url"),
        });
        strip_nulls(&mut profile);
        joined.insert(user.to_string(), profile);
    }
    Ok(Json(json!({ "joined": joined })))
}
