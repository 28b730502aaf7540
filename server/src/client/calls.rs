//! MatrixRTC discovery and the call-token service: `rtc_foci` in the client well-known,
//! `/rtc/transports`, and the LiveKit JWT exchange of MSC4195 (`/get_token`) and of the
//! earlier lk-jwt-service (`/sfu/get`), both at [`SERVICE_PATH`].

use axum::{Json, Router, extract::State, routing::post};
use base64::Engine;
use ruma::{OwnedRoomId, OwnedServerName, OwnedUserId};
use serde::{Deserialize, Serialize};
use serde_json::Value as JsonValue;
use sha2::{Digest, Sha256};

use super::{AppState, sessions::{Authed, parse_body}};
use axum::response::IntoResponse;

use crate::{
    calls::{Admission, SERVICE_PATH, placement::serving_elsewhere, rights_in},
    error::{Error, ErrorCode, Result},
};

pub(super) fn routes(router: Router<AppState>) -> Router<AppState> {
    router
        .route("/_matrix/client/v1/rtc/transports", axum::routing::get(transports))
        .route("/_matrix/client/unstable/org.matrix.msc4143/rtc/transports", axum::routing::get(transports))
        .route(&format!("{SERVICE_PATH}/get_token"), post(get_token))
        .route(&format!("{SERVICE_PATH}/sfu/get"), post(sfu_get))
        .route("/rtc", axum::routing::get(crate::livekit::signal::rtc))
        .route("/rtc/validate", axum::routing::get(crate::livekit::signal::validate))
        .route("/rtc/v1", axum::routing::get(crate::livekit::signal::rtc_v1))
        .route("/rtc/v1/validate", axum::routing::get(crate::livekit::signal::validate_v1))
        .route("/twirp/livekit.RoomService/{method}", post(crate::livekit::room_service::room_service))
        .route("/_limbic/client/v1/sessions/{room_id}/recording", axum::routing::put(set_recording))
        .route("/_limbic/client/v1/sessions/{room_id}/recordings", axum::routing::get(list_recordings))
        .route("/_matrix/client/v3/voip/turnServer", axum::routing::get(turn_server))
}

/// `GET /voip/turnServer`: empty when no TURN server is configured (as Synapse answers).
#[derive(Serialize)]
struct TurnServer {
    #[serde(flatten)]
    credentials: Option<crate::calls::turn::TurnCredentials>,
}

async fn turn_server(State(server): State<AppState>, Authed(caller): Authed) -> Json<TurnServer> {
    Json(TurnServer { credentials: server.calls.turn.credentials(caller.user_id.as_str()) })
}

#[derive(Deserialize)]
struct SetRecording {
    recording: bool,
}

/// Starts or stops recording a session's call (its therapists only), on the node serving it.
async fn set_recording(
    State(server): State<AppState>,
    Authed(caller): Authed,
    axum::extract::Path(room): axum::extract::Path<String>,
    uri: axum::http::Uri,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Result<axum::response::Response> {
    let set: SetRecording = parse_body(&body)?;
    let room_id = super::sessions::room_id(&room)?;
    if let Some(url) = serving_elsewhere(&*server, &room_id, &headers)? {
        let forwarded = server.peers.forward(&url, axum::http::Method::PUT, &uri, &headers, body, crate::calls::placement::FORWARD_TIMEOUT).await?;
        return Ok(forwarded.map(axum::body::Body::from));
    }
    let recorded = if set.recording {
        crate::calls::recording::start(&*server, &caller.user_id, &room_id).await?
    } else {
        let stopped = crate::calls::recording::stop(&*server, &room_id, crate::calls::recording::StopReason::Therapist(&caller.user_id)).await?;
        stopped.ok_or_else(|| Error::new(ErrorCode::BadState, "the call is not being recorded"))?
    };
    Ok(Json(recorded).into_response())
}


/// `GET /sessions/{roomId}/recordings`.
#[derive(Serialize)]
struct RecordingList {
    recordings: Vec<crate::calls::recording::RecordingFile>,
}

/// The recordings of a session's calls (its therapists only).
async fn list_recordings(State(server): State<AppState>, Authed(caller): Authed, axum::extract::Path(room): axum::extract::Path<String>) -> Result<Json<RecordingList>> {
    let room_id = super::sessions::room_id(&room)?;
    Ok(Json(RecordingList { recordings: crate::calls::recording::list(&*server, &caller.user_id, &room_id)? }))
}

/// A transport this server offers for MatrixRTC calls (MSC4143), as in the client well-known.
#[derive(Serialize)]
pub(super) struct Focus {
    #[serde(rename = "type")]
    kind: &'static str,
    livekit_service_url: String,
}

/// The transports this server offers: its SFU's token service, when calls are on.
pub(super) fn foci(server: &AppState) -> Vec<Focus> {
    if !server.calls.config.enabled {
        return Vec::new();
    }
    vec![Focus { kind: "livekit", livekit_service_url: server.calls.service_url.clone() }]
}

/// `GET /rtc/transports`.
#[derive(Serialize)]
struct Transports {
    rtc_transports: Vec<Focus>,
}

async fn transports(State(server): State<AppState>, Authed(_caller): Authed) -> Json<Transports> {
    Json(Transports { rtc_transports: foci(&server) })
}

/// A call token and where to use it (both token APIs answer this).
#[derive(Serialize)]
struct CallToken {
    url: String,
    jwt: String,
}

/// The OpenID token a client got from its homeserver for us.
#[derive(Deserialize)]
struct OpenIdToken {
    access_token: String,
    matrix_server_name: OwnedServerName,
}

#[derive(Deserialize)]
struct Member {
    id: String,
    claimed_user_id: OwnedUserId,
    claimed_device_id: String,
}

/// MSC4195: `{room_id, slot_id, openid_token, member}`.
#[derive(Deserialize)]
struct TokenRequest {
    room_id: OwnedRoomId,
    slot_id: String,
    openid_token: OpenIdToken,
    member: Member,
}

/// lk-jwt-service's earlier `/sfu/get`: `{room, openid_token, device_id}`.
#[derive(Deserialize)]
struct LegacyRequest {
    room: OwnedRoomId,
    openid_token: OpenIdToken,
    device_id: String,
}

async fn get_token(State(server): State<AppState>, body: axum::body::Bytes) -> Result<Json<CallToken>> {
    let request: TokenRequest = parse_body(&body)?;
    let user = openid_user(&server, &request.openid_token).await?;
    if user != request.member.claimed_user_id {
        return Err(Error::forbidden("the member's user is not the OpenID token's"));
    }
    let identity = hashed(&[user.as_str(), &request.member.claimed_device_id, &request.member.id]);
    let sfu_room = hashed(&[request.room_id.as_str(), &request.slot_id]);
    answer(&server, user, request.room_id, identity, sfu_room).await
}

async fn sfu_get(State(server): State<AppState>, body: axum::body::Bytes) -> Result<Json<CallToken>> {
    let request: LegacyRequest = parse_body(&body)?;
    let user = openid_user(&server, &request.openid_token).await?;
    let identity = format!("{user}:{}", request.device_id);
    // The room's call slot, so that clients of both APIs meet in one call.
    let sfu_room = hashed(&[request.room.as_str(), ROOM_CALL_SLOT]);
    answer(&server, user, request.room, identity, sfu_room).await
}

async fn answer(server: &AppState, user: OwnedUserId, room_id: OwnedRoomId, identity: String, sfu_room: String) -> Result<Json<CallToken>> {
    if !server.calls.config.enabled {
        return Err(Error::not_found("calls are not enabled on this server"));
    }
    let rights = rights_in(&server.rooms, &room_id, &user)?;
    let display_name = server
        .rooms
        .state_content(&room_id, "m.room.member", user.as_str())?
        .and_then(|member| member.get("displayname").and_then(JsonValue::as_str).map(str::to_owned))
        .unwrap_or_else(|| user.localpart().to_owned());
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_err(Error::internal)?.as_secs();
    // Where the call is served: the token names the node, and the answer its URL.
    let placed = crate::calls::placement::place(&**server, &room_id).await?;
    let admission = Admission { identity, display_name, user_id: user.to_string(), matrix_room: room_id.clone(), sfu_room, rights, node: placed.node };
    let jwt = server.calls.issue(admission, now)?;
    tracing::info!(%room_id, %user, "issued a call token");
    Ok(Json(CallToken { url: placed.signalling_url, jwt }))
}

/// The user an OpenID token stands for: asked of its server (ours, or another's over
/// federation's `openid/userinfo`).
async fn openid_user(server: &AppState, token: &OpenIdToken) -> Result<OwnedUserId> {
    let refused = || Error::new(ErrorCode::UnknownToken, "the OpenID token is not valid");
    let user = if token.matrix_server_name == server.server_name() {
        server.users.openid_user(&token.access_token)?.ok_or_else(refused)?
    } else {
        let federation = server.federation.as_ref().ok_or_else(|| Error::forbidden("this server does not federate, so only its own users may call"))?;
        // Tokens are opaque but URL-safe in every homeserver we know; anything else is refused
        // rather than encoded.
        if token.access_token.is_empty() || !token.access_token.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.~".contains(&b)) {
            return Err(refused());
        }
        let path = format!("/_matrix/federation/v1/openid/userinfo?access_token={}", token.access_token);
        let answer = federation.get_unsigned(&token.matrix_server_name, &path).await.map_err(|error| {
            tracing::info!(server = %token.matrix_server_name, %error, "an OpenID token was not confirmed");
            refused()
        })?;
        answer.get("sub").and_then(JsonValue::as_str).and_then(|sub| OwnedUserId::try_from(sub).ok()).ok_or_else(refused)?
    };
    if user.server_name() != token.matrix_server_name {
        return Err(refused());
    }
    Ok(user)
}

/// The MatrixRTC slot of a room's one call, which the earlier API always means.
const ROOM_CALL_SLOT: &str = "m.call#ROOM";

/// SFU names as MSC4195's reference service (lk-jwt-service) makes them, so that they do not
/// reveal the room or the device: unpadded base64 of the SHA-256 of the parts as a compact
/// JSON array.
fn hashed(parts: &[&str]) -> String {
    let array = serde_json::to_string(parts).expect("strings serialize");
    base64::engine::general_purpose::STANDARD_NO_PAD.encode(Sha256::digest(array))
}

#[cfg(test)]
mod tests {
    #[test]
    fn sfu_names_match_the_msc4195_test_vectors() {
        assert_eq!(super::hashed(&["!roomid:example.com", "slot1234"]), "O8437W3+jmzMVjoIP3tNwbm+XxHQk2iKpOA7aqw3qSc");
        assert_eq!(super::hashed(&["@alice:example.com", "DEVICE123", "memberABC"]), "J+T45tGruxc+HrUOqJJlyQSV33m728Cme4+vt8/SWrU");
    }
}
