//! Room creation (`room_creation` builds the room) and room-level reads: createRoom,
//! /joined_rooms, /members, /joined_members.

use axum::{Json, Router, extract::State};
use ruma::api::client::{
    membership::{get_member_events, joined_members, joined_rooms},
    room::create_room,
};
use serde_json::{Value as JsonValue, json};

use super::{AppState, Ruma, RumaResponse, account::strip_nulls, events::{client_event, read_view}, route};
use crate::{
    error::{Error, Result},
    ratelimit::Action,
    room_creation::NewRoom,
    rooms::{Membership, ReadView},
};

pub(super) fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = route::<create_room::v3::Request, _, _>(router, create_room_handler);
    let router = route::<joined_rooms::v3::Request, _, _>(router, joined_rooms_handler);
    let router = route::<get_member_events::v3::Request, _, _>(router, members_handler);
    route::<joined_members::v3::Request, _, _>(router, joined_members_handler)
}

/// A raw JSON object of the request, as the client sent it.
fn object_of(raw: &ruma::serde::Raw<impl Sized>) -> Result<JsonValue> {
    serde_json::from_str(raw.json().get()).map_err(|e| Error::bad_json(e.to_string()))
}

async fn create_room_handler(
    State(server): State<AppState>,
    req: Ruma<create_room::v3::Request>,
) -> Result<RumaResponse<create_room::v3::Response>> {
    server.rate_limiter.check(Action::CreateRoom, &req.rate_keys())?;
    let body = &req.body;
    let room = NewRoom {
        version: body.room_version.clone(),
        preset: body.preset.clone(),
        visibility: body.visibility.clone(),
        alias_localpart: body.room_alias_name.clone(),
        creation_content: body.creation_content.as_ref().map(object_of).transpose()?,
        power_level_content_override: body.power_level_content_override.as_ref().map(object_of).transpose()?,
        initial_state: body.initial_state.iter().map(object_of).collect::<Result<_>>()?,
        name: body.name.clone(),
        topic: body.topic.clone(),
        invite: body.invite.clone(),
        is_direct: body.is_direct,
    };
    let room_id = crate::room_creation::create(&*server, &req.caller().user_id, room).await?;
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
