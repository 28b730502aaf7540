//! What Element-class clients also call: room tags, the user directory, third-party ids and
//! protocols (none are configured).

use axum::{Json, Router, extract::State};
use ruma::api::client::{
    account::get_3pids,
    tag::{create_tag, delete_tag, get_tags},
    thirdparty::get_protocols,
    user_directory::search_users,
};
use serde_json::{Value as JsonValue, json};

use super::{AppState, Ruma, RumaResponse, route};
use crate::{
    error::{Error, Result},
    users::Caller,
};

pub(super) fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = route::<get_tags::v3::Request, _, _>(router, tags);
    let router = route::<create_tag::v3::Request, _, _>(router, set_tag);
    let router = route::<delete_tag::v3::Request, _, _>(router, delete_tag_handler);
    let router = route::<search_users::v3::Request, _, _>(router, search);
    let router = route::<get_3pids::v3::Request, _, _>(router, threepids);
    route::<get_protocols::v3::Request, _, _>(router, protocols)
}

/// Tags are the room account data `m.tag`; only the owner reads or writes them.
fn room_tags(server: &AppState, caller: &Caller, user_id: &ruma::UserId, room_id: &ruma::RoomId) -> Result<serde_json::Map<String, JsonValue>> {
    if user_id != caller.user_id {
        return Err(Error::forbidden("you can only access your own tags"));
    }
    Ok(server
        .users
        .account_data(user_id, Some(room_id), "m.tag")?
        .and_then(|c| c.get("tags").and_then(JsonValue::as_object).cloned())
        .unwrap_or_default())
}

fn save_tags(server: &AppState, user_id: &ruma::UserId, room_id: &ruma::RoomId, tags: serde_json::Map<String, JsonValue>) -> Result<()> {
    server.users.set_account_data(user_id, Some(room_id), "m.tag", json!({ "tags": tags }))
}

async fn tags(State(server): State<AppState>, req: Ruma<get_tags::v3::Request>) -> Result<Json<JsonValue>> {
    Ok(Json(json!({ "tags": room_tags(&server, req.caller(), &req.body.user_id, &req.body.room_id)? })))
}

async fn set_tag(State(server): State<AppState>, req: Ruma<create_tag::v3::Request>) -> Result<RumaResponse<create_tag::v3::Response>> {
    let body = &req.body;
    let mut tags = room_tags(&server, req.caller(), &body.user_id, &body.room_id)?;
    let info = req.json.clone().filter(JsonValue::is_object).unwrap_or_else(|| json!({}));
    tags.insert(body.tag.clone(), info);
    save_tags(&server, &body.user_id, &body.room_id, tags)?;
    Ok(create_tag::v3::Response::new().into())
}

async fn delete_tag_handler(State(server): State<AppState>, req: Ruma<delete_tag::v3::Request>) -> Result<RumaResponse<delete_tag::v3::Response>> {
    let body = &req.body;
    let mut tags = room_tags(&server, req.caller(), &body.user_id, &body.room_id)?;
    tags.remove(&body.tag);
    save_tags(&server, &body.user_id, &body.room_id, tags)?;
    Ok(delete_tag::v3::Response::new().into())
}

/// The user directory, in the scope `[privacy]` allows (`crate::privacy::search_directory`).
async fn search(State(server): State<AppState>, req: Ruma<search_users::v3::Request>) -> Result<Json<JsonValue>> {
    let limit = u64::from(req.body.limit).clamp(1, 100) as usize;
    let (results, limited) = crate::privacy::search_directory(&*server, &server.config.privacy, &req.caller().user_id, &req.body.search_term, limit)?;
    Ok(Json(json!({ "results": results, "limited": limited })))
}

async fn threepids(_req: Ruma<get_3pids::v3::Request>) -> Json<JsonValue> {
    Json(json!({ "threepids": [] }))
}

async fn protocols(_req: Ruma<get_protocols::v3::Request>) -> Json<JsonValue> {
    Json(json!({}))
}
