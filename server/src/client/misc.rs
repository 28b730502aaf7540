//! Typing, receipts and read markers, account data, filters, presence; health and metrics.

use std::time::Duration;

use axum::{Json, Router, extract::State, response::IntoResponse};
use ruma::api::client::{
    config::{get_global_account_data, get_room_account_data, set_global_account_data, set_room_account_data},
    filter::{create_filter, get_filter},
    presence::{get_presence, set_presence},
    read_marker::set_read_marker,
    receipt::create_receipt,
    typing::create_typing_event,
};
use serde_json::{Value as JsonValue, json};

use super::{AppState, Ruma, RumaResponse, route};
use crate::error::{Error, ErrorCode, Result};

pub(super) fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = route::<create_typing_event::v3::Request, _, _>(router, typing);
    let router = route::<create_receipt::v3::Request, _, _>(router, receipt);
    let router = route::<set_read_marker::v3::Request, _, _>(router, read_markers);
    let router = route::<set_global_account_data::v3::Request, _, _>(router, set_global_data);
    let router = route::<get_global_account_data::v3::Request, _, _>(router, get_global_data);
    let router = route::<set_room_account_data::v3::Request, _, _>(router, set_room_data);
    let router = route::<get_room_account_data::v3::Request, _, _>(router, get_room_data);
    let router = route::<create_filter::v3::Request, _, _>(router, create_filter_handler);
    let router = route::<get_filter::v3::Request, _, _>(router, get_filter_handler);
    let router = route::<set_presence::v3::Request, _, _>(router, set_presence_handler);
    let router = route::<get_presence::v3::Request, _, _>(router, get_presence_handler);
    router
        .route("/health", axum::routing::get(health))
        .route("/_limbic/health", axum::routing::get(health))
        .route("/metrics", axum::routing::get(metrics))
}

const MAX_TYPING: Duration = Duration::from_secs(120);

async fn typing(
    State(server): State<AppState>,
    req: Ruma<create_typing_event::v3::Request>,
) -> Result<RumaResponse<create_typing_event::v3::Response>> {
    let caller = req.caller();
    if req.body.user_id != caller.user_id {
        return Err(Error::forbidden("you can only set your own typing state"));
    }
    if !server.rooms.is_joined(&req.body.room_id, &caller.user_id)? {
        return Err(Error::forbidden("you are not joined to this room"));
    }
    let timeout = match req.body.state {
        create_typing_event::v3::Typing::Yes(info) => Some(info.timeout.min(MAX_TYPING)),
        _ => None,
    };
    server.rooms.set_typing(&req.body.room_id, &caller.user_id, timeout)?;
    Ok(create_typing_event::v3::Response::new().into())
}

/// Checks the event is in the room and visible, then records the receipt.
fn record_receipt(server: &AppState, caller: &crate::users::Caller, room_id: &ruma::RoomId, kind: &str, event_id: &ruma::EventId, thread: Option<String>) -> Result<()> {
    if !server.rooms.is_joined(room_id, &caller.user_id)? {
        return Err(Error::forbidden("you are not joined to this room"));
    }
    let pdu = server.rooms.pdu(event_id)?.filter(|p| p.room_id == room_id);
    if pdu.is_none() {
        return Err(Error::not_found("event not found in this room"));
    }
    match kind {
        "m.fully_read" => server.users.set_account_data(&caller.user_id, Some(room_id), "m.fully_read", json!({ "event_id": event_id })),
        _ => server.rooms.set_receipt(room_id, kind, &caller.user_id, event_id.to_owned(), thread),
    }
}

async fn receipt(
    State(server): State<AppState>,
    req: Ruma<create_receipt::v3::Request>,
) -> Result<RumaResponse<create_receipt::v3::Response>> {
    let kind = req.body.receipt_type.to_string();
    if !matches!(kind.as_str(), "m.read" | "m.read.private" | "m.fully_read") {
        return Err(Error::invalid_param(format!("unsupported receipt type {kind}")));
    }
    let thread = match &req.body.thread {
        ruma::events::receipt::ReceiptThread::Main => Some("main".to_owned()),
        ruma::events::receipt::ReceiptThread::Thread(id) => Some(id.to_string()),
        _ => None,
    };
    record_receipt(&server, req.caller(), &req.body.room_id, &kind, &req.body.event_id, thread)?;
    Ok(create_receipt::v3::Response::new().into())
}

async fn read_markers(
    State(server): State<AppState>,
    req: Ruma<set_read_marker::v3::Request>,
) -> Result<RumaResponse<set_read_marker::v3::Response>> {
    let caller = req.caller();
    let room_id = &req.body.room_id;
    for (kind, event_id) in [
        ("m.fully_read", &req.body.fully_read),
        ("m.read", &req.body.read_receipt),
        ("m.read.private", &req.body.private_read_receipt),
    ] {
        if let Some(event_id) = event_id {
            record_receipt(&server, caller, room_id, kind, event_id, None)?;
        }
    }
    Ok(set_read_marker::v3::Response::new().into())
}

fn own_data(req_user: &ruma::UserId, caller: &crate::users::Caller) -> Result<()> {
    if req_user != caller.user_id {
        return Err(Error::forbidden("you can only access your own account data"));
    }
    Ok(())
}

/// Account data the server manages itself is refused with 405, as the spec says.
fn server_controlled(kind: &str) -> Error {
    Error::with_status(ErrorCode::BadJson, http::StatusCode::METHOD_NOT_ALLOWED, format!("{kind} is managed by the server and cannot be set here"))
}

fn data_content(raw: &serde_json::value::RawValue) -> Result<JsonValue> {
    let content: JsonValue = serde_json::from_str(raw.get()).map_err(|e| Error::bad_json(e.to_string()))?;
    if !content.is_object() {
        return Err(Error::bad_json("account data must be a JSON object"));
    }
    Ok(content)
}

async fn set_global_data(
    State(server): State<AppState>,
    req: Ruma<set_global_account_data::v3::Request>,
) -> Result<RumaResponse<set_global_account_data::v3::Response>> {
    own_data(&req.body.user_id, req.caller())?;
    let kind = req.body.event_type.to_string();
    if kind == "m.fully_read" || kind == "m.push_rules" {
        return Err(server_controlled(&kind));
    }
    server.users.set_account_data(&req.body.user_id, None, &kind, data_content(req.body.data.json())?)?;
    Ok(set_global_account_data::v3::Response::new().into())
}

async fn get_global_data(State(server): State<AppState>, req: Ruma<get_global_account_data::v3::Request>) -> Result<Json<JsonValue>> {
    own_data(&req.body.user_id, req.caller())?;
    server
        .users
        .account_data(&req.body.user_id, None, &req.body.event_type.to_string())?
        .map(Json)
        .ok_or_else(|| Error::not_found("account data not found"))
}

async fn set_room_data(
    State(server): State<AppState>,
    req: Ruma<set_room_account_data::v3::Request>,
) -> Result<RumaResponse<set_room_account_data::v3::Response>> {
    own_data(&req.body.user_id, req.caller())?;
    let kind = req.body.event_type.to_string();
    if kind == "m.fully_read" || kind == "m.push_rules" {
        return Err(server_controlled(&kind));
    }
    if !server.rooms.exists(&req.body.room_id)? {
        return Err(Error::not_found("unknown room"));
    }
    server.users.set_account_data(&req.body.user_id, Some(&req.body.room_id), &kind, data_content(req.body.data.json())?)?;
    Ok(set_room_account_data::v3::Response::new().into())
}

async fn get_room_data(State(server): State<AppState>, req: Ruma<get_room_account_data::v3::Request>) -> Result<Json<JsonValue>> {
    own_data(&req.body.user_id, req.caller())?;
    server
        .users
        .account_data(&req.body.user_id, Some(&req.body.room_id), &req.body.event_type.to_string())?
        .map(Json)
        .ok_or_else(|| Error::not_found("account data not found"))
}

async fn create_filter_handler(
    State(server): State<AppState>,
    req: Ruma<create_filter::v3::Request>,
) -> Result<RumaResponse<create_filter::v3::Response>> {
    own_data(&req.body.user_id, req.caller())?;
    // Store the definition as the client sent it.
    let definition = req.json.clone().unwrap_or_else(|| json!({}));
    let filter_id = server.users.create_filter(&req.body.user_id, &definition)?;
    Ok(create_filter::v3::Response::new(filter_id).into())
}

async fn get_filter_handler(State(server): State<AppState>, req: Ruma<get_filter::v3::Request>) -> Result<Json<JsonValue>> {
    own_data(&req.body.user_id, req.caller())?;
    server
        .users
        .filter(&req.body.user_id, &req.body.filter_id)?
        .map(Json)
        .ok_or_else(|| Error::not_found("filter not found"))
}

fn presence_disabled() -> Error {
    Error::with_status(ErrorCode::Forbidden, http::StatusCode::FORBIDDEN, "presence is disabled on this server")
}

async fn set_presence_handler(
    State(server): State<AppState>,
    req: Ruma<set_presence::v3::Request>,
) -> Result<RumaResponse<set_presence::v3::Response>> {
    if !server.config.presence.enabled {
        return Err(presence_disabled());
    }
    if req.body.user_id != req.caller().user_id {
        return Err(Error::forbidden("you can only set your own presence"));
    }
    let presence = req.body.presence.as_str();
    if !matches!(presence, "online" | "offline" | "unavailable") {
        return Err(Error::invalid_param(format!("unknown presence state {presence:?}")));
    }
    server.users.set_presence(&req.body.user_id, presence, req.body.status_msg.clone())?;
    crate::federation::sender::presence_changed(&*server, &req.body.user_id)?;
    Ok(set_presence::v3::Response::new().into())
}

async fn get_presence_handler(State(server): State<AppState>, req: Ruma<get_presence::v3::Request>) -> Result<Json<JsonValue>> {
    if !server.config.presence.enabled {
        return Err(presence_disabled());
    }
    crate::privacy::check_lookup(&*server, &server.config.privacy, Some(&req.caller().user_id), &req.body.user_id, crate::privacy::Lookup::Presence)?;
    if !server.users.exists(&req.body.user_id)? {
        return Err(Error::not_found("unknown user"));
    }
    let presence = server.users.presence(&req.body.user_id)?;
    Ok(Json(match presence {
        Some(p) => {
            let now: u64 = ruma::MilliSecondsSinceUnixEpoch::now().0.into();
            let mut body = json!({
                "presence": p.presence,
                "last_active_ago": now.saturating_sub(p.last_active_ts),
                "currently_active": p.presence == "online",
            });
            if let Some(status) = p.status_msg {
                body["status_msg"] = json!(status);
            }
            body
        }
        None => json!({ "presence": "offline" }),
    }))
}

async fn health() -> &'static str {
    "OK"
}

async fn metrics(State(server): State<AppState>) -> impl IntoResponse {
    (
        [(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        server.metrics.render(server.store.approximate_size()),
    )
}
