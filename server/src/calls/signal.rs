//! LiveKit's signalling endpoint: `/rtc` (a WebSocket of protobuf `SignalRequest` and
//! `SignalResponse` frames) and `/rtc/validate`. Clients first try the single-connection
//! `/rtc/v1`, which is not served: its 404 makes them use `/rtc`.

use axum::{
    extract::{
        Query, State,
        ws::{Message, WebSocket, WebSocketUpgrade},
    },
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use livekit_protocol as lk;
use prost::Message as _;
use serde::Deserialize;
use tokio::sync::mpsc;

use super::{Claims, media::ToParticipant};
use crate::server::Server;

type AppState = std::sync::Arc<Server>;

#[derive(Deserialize)]
pub struct RtcQuery {
    access_token: Option<String>,
    auto_subscribe: Option<String>,
    reconnect: Option<String>,
}

/// The call token, from `Authorization: Bearer` (LiveKit's Rust and Python SDKs) or
/// `?access_token=` (the JavaScript SDK).
fn claims(server: &Server, headers: &HeaderMap, query: &RtcQuery) -> Result<Claims, Response> {
    let bearer = headers.get(http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    let Some(token) = bearer.or(query.access_token.as_deref()) else {
        return Err((StatusCode::UNAUTHORIZED, "missing access token").into_response());
    };
    server.calls.verify(token).map_err(|error| (StatusCode::UNAUTHORIZED, error.to_string()).into_response())
}

pub async fn validate(State(server): State<AppState>, headers: HeaderMap, Query(query): Query<RtcQuery>) -> Response {
    match claims(&server, &headers, &query) {
        Ok(_) => (StatusCode::OK, "success").into_response(),
        Err(refused) => refused,
    }
}

pub async fn rtc(State(server): State<AppState>, headers: HeaderMap, Query(query): Query<RtcQuery>, upgrade: WebSocketUpgrade) -> Response {
    let claims = match claims(&server, &headers, &query) {
        Ok(claims) => claims,
        Err(refused) => return refused,
    };
    let Some(sfu) = server.calls.sfu.get().cloned() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "calls are not running on this server").into_response();
    };
    let auto_subscribe = query.auto_subscribe.as_deref() != Some("0");
    // A recorded call goes on only while everyone in it consents.
    let room = claims.matrix_room.clone();
    let recorded = sfu.run(move |sfu, _| sfu.is_recording(room.as_str())).await == Some(true);
    if recorded
        && let Ok(user) = ruma::OwnedUserId::try_from(claims.matrix_user.as_str())
        && !super::recording::consented(&server, &claims.matrix_room, user.as_str()).unwrap_or(false)
    {
        super::recording::stop_without_consent(&server, &claims.matrix_room, &user, true).await;
    }
    let reconnect = query.reconnect.as_deref() == Some("1");
    upgrade.on_upgrade(move |socket| async move {
        if reconnect {
            // Resuming is not supported: the client is told to join afresh.
            refuse_resume(socket).await;
            return;
        }
        session(socket, sfu, claims, auto_subscribe).await;
    })
}

async fn refuse_resume(mut socket: WebSocket) {
    let leave = lk::LeaveRequest {
        can_reconnect: true,
        reason: lk::DisconnectReason::StateMismatch as i32,
        action: lk::leave_request::Action::Reconnect as i32,
        ..Default::default()
    };
    let response = lk::SignalResponse { message: Some(lk::signal_response::Message::Leave(leave)) };
    let _ = socket.send(Message::Binary(response.encode_to_vec().into())).await;
    let _ = socket.send(Message::Close(None)).await;
}

async fn session(mut socket: WebSocket, sfu: super::media::SfuHandle, claims: Claims, auto_subscribe: bool) {
    let (to, mut from_sfu) = mpsc::unbounded_channel();
    let (room, identity) = (claims.matrix_room.clone(), claims.sub.clone());
    let Some(id) = sfu.join(claims, auto_subscribe, to).await else { return };
    tracing::info!(%room, %identity, participant = id, "joined a call");
    loop {
        tokio::select! {
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Binary(bytes))) => match lk::SignalRequest::decode(bytes.as_ref()) {
                    Ok(request) => sfu.signal(id, request),
                    Err(error) => tracing::debug!(participant = id, %error, "an unreadable signalling request"),
                },
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
            outgoing = from_sfu.recv() => match outgoing {
                Some(ToParticipant::Signal(response)) => {
                    if socket.send(Message::Binary(response.encode_to_vec().into())).await.is_err() {
                        break;
                    }
                }
                Some(ToParticipant::Close) | None => break,
            },
        }
    }
    sfu.leave(id);
    tracing::info!(%room, %identity, participant = id, "left a call");
}
