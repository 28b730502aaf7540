//! Breakout rooms of a session (`/_limbic/client/v1/sessions/{roomId}/breakouts`): the HTTP
//! side of `clinic::breakouts`.

use axum::{
    Json, Router,
    extract::{Path, State},
    routing::{get, put},
};
use serde_json::{Value as JsonValue, json};

use super::{
    AppState,
    sessions::{Authed, parse_body, room_id, user_id},
};
use crate::{
    clinic::breakouts::{self, NewBreakout},
    error::Result,
};

pub(super) fn routes(router: Router<AppState>) -> Router<AppState> {
    const BREAKOUTS: &str = "/_limbic/client/v1/sessions/{room_id}/breakouts";
    router
        .route(BREAKOUTS, get(list_breakouts).post(create_breakout))
        .route(&format!("{BREAKOUTS}/{{breakout_id}}"), axum::routing::delete(close_breakout))
        .route(&format!("{BREAKOUTS}/{{breakout_id}}/participants/{{user_id}}"), put(assign).delete(unassign))
}

/// Creates a breakout room, with the session's therapists and the given participants invited.
async fn create_breakout(State(server): State<AppState>, Authed(caller): Authed, Path(room): Path<String>, body: axum::body::Bytes) -> Result<Json<JsonValue>> {
    let request: NewBreakout = parse_body(&body)?;
    let room_id = breakouts::create(&server, &caller.user_id, &room_id(&room)?, request).await?;
    Ok(Json(json!({ "room_id": room_id })))
}

/// The session's breakout rooms with who is in them; for its members and participants.
async fn list_breakouts(State(server): State<AppState>, Authed(caller): Authed, Path(room): Path<String>) -> Result<Json<JsonValue>> {
    Ok(Json(json!({ "breakouts": breakouts::list(&server, &caller.user_id, &room_id(&room)?)? })))
}

/// Moves a participant into a breakout room (out of any other).
async fn assign(State(server): State<AppState>, Authed(caller): Authed, Path((room, breakout, user)): Path<(String, String, String)>) -> Result<Json<JsonValue>> {
    breakouts::assign(&server, &caller.user_id, &room_id(&room)?, &room_id(&breakout)?, &user_id(&user)?).await?;
    Ok(Json(json!({})))
}

/// Sends a participant back to the main room.
async fn unassign(State(server): State<AppState>, Authed(caller): Authed, Path((room, breakout, user)): Path<(String, String, String)>) -> Result<Json<JsonValue>> {
    breakouts::unassign(&server, &caller.user_id, &room_id(&room)?, &room_id(&breakout)?, &user_id(&user)?).await?;
    Ok(Json(json!({})))
}

/// Closes a breakout room: everyone returns to the main room.
async fn close_breakout(State(server): State<AppState>, Authed(caller): Authed, Path((room, breakout)): Path<(String, String)>) -> Result<Json<JsonValue>> {
    breakouts::close(&server, &caller.user_id, &room_id(&room)?, &room_id(&breakout)?).await?;
    Ok(Json(json!({})))
}
