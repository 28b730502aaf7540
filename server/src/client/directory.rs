//! Room aliases and the public room directory.

use axum::{Json, Router, extract::State};
use ruma::api::client::{
    alias::{create_alias, delete_alias, get_alias},
    directory::{get_public_rooms, get_public_rooms_filtered, get_room_visibility, set_room_visibility},
    room::{Visibility, aliases},
};
use serde_json::{Value as JsonValue, json};

use super::{AppState, Ruma, RumaResponse, route};
use crate::error::{Error, Result};

pub(super) fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = route::<create_alias::v3::Request, _, _>(router, create_alias_handler);
    let router = route::<get_alias::v3::Request, _, _>(router, get_alias_handler);
    let router = route::<delete_alias::v3::Request, _, _>(router, delete_alias_handler);
    let router = route::<aliases::v3::Request, _, _>(router, room_aliases);
    let router = route::<get_public_rooms::v3::Request, _, _>(router, public_rooms);
    let router = route::<get_public_rooms_filtered::v3::Request, _, _>(router, public_rooms_filtered);
    let router = route::<get_room_visibility::v3::Request, _, _>(router, get_visibility);
    route::<set_room_visibility::v3::Request, _, _>(router, set_visibility)
}

async fn create_alias_handler(
    State(server): State<AppState>,
    req: Ruma<create_alias::v3::Request>,
) -> Result<RumaResponse<create_alias::v3::Response>> {
    let caller = req.caller();
    if req.body.room_alias.server_name() != server.server_name() {
        return Err(Error::invalid_param("aliases must be on this server"));
    }
    if !server.rooms.exists(&req.body.room_id)? {
        return Err(Error::not_found("unknown room"));
    }
    if !server.rooms.is_joined(&req.body.room_id, &caller.user_id)? {
        return Err(Error::forbidden("you are not joined to this room"));
    }
    server.rooms.set_alias(&req.body.room_alias, &req.body.room_id, &caller.user_id)?;
    Ok(create_alias::v3::Response::new().into())
}

async fn get_alias_handler(
    State(server): State<AppState>,
    req: Ruma<get_alias::v3::Request>,
) -> Result<RumaResponse<get_alias::v3::Response>> {
    let room_id = server
        .rooms
        .resolve_alias(&req.body.room_alias)?
        .ok_or_else(|| Error::not_found("room alias not found"))?;
    Ok(get_alias::v3::Response::new(room_id, vec![server.config.server_name.clone()]).into())
}

async fn delete_alias_handler(
    State(server): State<AppState>,
    req: Ruma<delete_alias::v3::Request>,
) -> Result<RumaResponse<delete_alias::v3::Response>> {
    let caller = req.caller();
    let alias = &req.body.room_alias;
    let room_id = server.rooms.resolve_alias(alias)?.ok_or_else(|| Error::not_found("room alias not found"))?;
    let is_owner = server.rooms.alias_owner(alias)?.as_deref() == Some(caller.user_id.as_ref());
    let admin = server.users.is_admin(&caller.user_id)?;
    let can_moderate = server.rooms.is_joined(&room_id, &caller.user_id)?
        && server.rooms.user_power_level(&room_id, &caller.user_id)? >= 50;
    if !(is_owner || admin || can_moderate) {
        return Err(Error::forbidden("you may not remove this alias"));
    }
    server.rooms.remove_alias(alias)?;
    Ok(delete_alias::v3::Response::new().into())
}

async fn room_aliases(
    State(server): State<AppState>,
    req: Ruma<aliases::v3::Request>,
) -> Result<RumaResponse<aliases::v3::Response>> {
    if !server.rooms.is_joined(&req.body.room_id, &req.caller().user_id)? {
        return Err(Error::forbidden("you are not joined to this room"));
    }
    Ok(aliases::v3::Response::new(server.rooms.local_aliases(&req.body.room_id)?).into())
}

/// One page of the public directory, optionally filtered by a search term.
pub(crate) fn directory_page(server: &AppState, limit: Option<usize>, since: Option<&str>, term: Option<&str>) -> Result<JsonValue> {
    let mut chunk = Vec::new();
    for room_id in server.rooms.public_rooms()? {
        let content = |kind: &str, field: &str| {
            server.rooms.state_content(&room_id, kind, "").ok().flatten().and_then(|c| c.get(field).cloned())
        };
        let name = content("m.room.name", "name");
        let topic = content("m.room.topic", "topic");
        let alias = content("m.room.canonical_alias", "alias");
        if let Some(term) = term.map(str::to_lowercase).filter(|t| !t.is_empty()) {
            let hay = [&name, &topic, &alias]
                .iter()
                .filter_map(|v| v.as_ref().and_then(|v| v.as_str()))
                .collect::<Vec<_>>()
                .join(" ")
                .to_lowercase();
            if !hay.contains(&term) {
                continue;
            }
        }
        let mut entry = json!({
            "room_id": room_id,
            "num_joined_members": server.rooms.joined_members(&room_id)?.len(),
            "world_readable": content("m.room.history_visibility", "history_visibility") == Some(json!("world_readable")),
            "guest_can_join": content("m.room.guest_access", "guest_access") == Some(json!("can_join")),
            "join_rule": content("m.room.join_rules", "join_rule").unwrap_or(json!("public")),
        });
        for (key, value) in [("name", name), ("topic", topic), ("canonical_alias", alias), ("avatar_url", content("m.room.avatar", "url"))] {
            if let Some(value) = value {
                entry[key] = value;
            }
        }
        chunk.push(entry);
    }
    chunk.sort_by(|a, b| b["num_joined_members"].as_u64().cmp(&a["num_joined_members"].as_u64()));
    let total = chunk.len();
    // `since` is a position this server handed out; anything else is refused, and no sum of
    // request numbers may overflow.
    let start: usize = match since {
        None => 0,
        Some(token) => token.parse().map_err(|_| Error::invalid_param("since is not a token from this server"))?,
    };
    let limit = limit.unwrap_or(total).max(1);
    let end = start.saturating_add(limit);
    let page: Vec<JsonValue> = chunk.into_iter().skip(start).take(limit).collect();
    let mut response = json!({ "chunk": page, "total_room_count_estimate": total });
    if end < total {
        response["next_batch"] = json!(end.to_string());
    }
    if start > 0 {
        response["prev_batch"] = json!(start.saturating_sub(limit).to_string());
    }
    Ok(response)
}

async fn public_rooms(State(server): State<AppState>, req: Ruma<get_public_rooms::v3::Request>) -> Result<Json<JsonValue>> {
    let limit = req.body.limit.map(|l| u64::from(l) as usize);
    Ok(Json(directory_page(&server, limit, req.body.since.as_deref(), None)?))
}

async fn public_rooms_filtered(
    State(server): State<AppState>,
    req: Ruma<get_public_rooms_filtered::v3::Request>,
) -> Result<Json<JsonValue>> {
    let limit = req.body.limit.map(|l| u64::from(l) as usize);
    let term = req.body.filter.generic_search_term.as_deref();
    Ok(Json(directory_page(&server, limit, req.body.since.as_deref(), term)?))
}

async fn get_visibility(
    State(server): State<AppState>,
    req: Ruma<get_room_visibility::v3::Request>,
) -> Result<RumaResponse<get_room_visibility::v3::Response>> {
    if !server.rooms.exists(&req.body.room_id)? {
        return Err(Error::not_found("unknown room"));
    }
    let visibility = if server.rooms.is_public(&req.body.room_id)? { Visibility::Public } else { Visibility::Private };
    Ok(get_room_visibility::v3::Response::new(visibility).into())
}

async fn set_visibility(
    State(server): State<AppState>,
    req: Ruma<set_room_visibility::v3::Request>,
) -> Result<RumaResponse<set_room_visibility::v3::Response>> {
    let caller = req.caller();
    let room_id = &req.body.room_id;
    if !server.rooms.exists(room_id)? {
        return Err(Error::not_found("unknown room"));
    }
    if !server.rooms.is_joined(room_id, &caller.user_id)? || server.rooms.user_power_level(room_id, &caller.user_id)? < 50 {
        return Err(Error::forbidden("you may not change the room's directory visibility"));
    }
    server.rooms.set_public(room_id, req.body.visibility == Visibility::Public)?;
    Ok(set_room_visibility::v3::Response::new().into())
}
