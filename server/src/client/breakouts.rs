//! Breakout rooms of a session (`/_limbic/client/v1/sessions/{roomId}/breakouts`): the HTTP
//! side of `clinic::breakouts`.

use axum::{
    Json, Router,
    extract::{Path, State},
    routing::{get, put},
};
use ruma::OwnedRoomId;
use serde::Serialize;

use super::{
    AppState,
    sessions::{Authed, Empty, parse_body, room_id, user_id},
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

/// `POST …/breakouts`.
#[derive(Serialize)]
struct Opened {
    room_id: OwnedRoomId,
}

/// `GET …/breakouts`.
#[derive(Serialize)]
struct BreakoutList {
    breakouts: Vec<breakouts::BreakoutView>,
}

/// Creates a breakout room, with the session's therapists and the given participants invited.
async fn create_breakout(State(server): State<AppState>, Authed(caller): Authed, Path(room): Path<String>, body: axum::body::Bytes) -> Result<Json<Opened>> {
    let request: NewBreakout = parse_body(&body)?;
    let room_id = breakouts::create(&server, &caller.user_id, &room_id(&room)?, request).await?;
    Ok(Json(Opened { room_id }))
}

/// The session's breakout rooms with who is in them; for its members and participants.
async fn list_breakouts(State(server): State<AppState>, Authed(caller): Authed, Path(room): Path<String>) -> Result<Json<BreakoutList>> {
    Ok(Json(BreakoutList { breakouts: breakouts::list(&server, &caller.user_id, &room_id(&room)?)? }))
}

/// Moves a participant into a breakout room (out of any other).
async fn assign(State(server): State<AppState>, Authed(caller): Authed, Path((room, breakout, user)): Path<(String, String, String)>) -> Result<Json<Empty>> {
    breakouts::assign(&server, &caller.user_id, &room_id(&room)?, &room_id(&breakout)?, &user_id(&user)?).await?;
    Ok(Json(Empty {}))
}

/// Sends a participant back to the main room.
async fn unassign(State(server): State<AppState>, Authed(caller): Authed, Path((room, breakout, user)): Path<(String, String, String)>) -> Result<Json<Empty>> {
    breakouts::unassign(&server, &caller.user_id, &room_id(&room)?, &room_id(&breakout)?, &user_id(&user)?).await?;
    Ok(Json(Empty {}))
}

/// Closes a breakout room: everyone returns to the main room.
async fn close_breakout(State(server): State<AppState>, Authed(caller): Authed, Path((room, breakout)): Path<(String, String)>) -> Result<Json<Empty>> {
    breakouts::close(&server, &caller.user_id, &room_id(&room)?, &room_id(&breakout)?).await?;
    Ok(Json(Empty {}))
}
