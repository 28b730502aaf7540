//! LiveKit's RoomService (Twirp over HTTP, JSON or protobuf), for moderators: list the
//! participants of a call, mute a participant's track, remove a participant. The caller's call
//! token must be for that room and carry `roomAdmin` (in a session: its therapists), and its
//! holder must still have the rights it grants.
//!
//! Unmuting someone else is refused: a participant's microphone and camera are theirs to open.

use axum::{
    body::Bytes,
    extract::{Path, State},
    http::{HeaderMap, StatusCode, header::CONTENT_TYPE},
    response::{IntoResponse, Response},
};
use livekit_protocol as lk;
use serde::{Serialize, de::DeserializeOwned};

use crate::Server;

type AppState = std::sync::Arc<Server>;

/// Twirp's error body: `{"code", "msg"}` with the matching HTTP status.
fn twirp_error(status: StatusCode, code: &str, msg: impl Into<String>) -> Response {
    (status, axum::Json(serde_json::json!({ "code": code, "msg": msg.into() }))).into_response()
}

/// A request in the client's encoding, and how to answer in it.
struct Encoding {
    protobuf: bool,
}

impl Encoding {
    fn of(headers: &HeaderMap) -> Self {
        let content_type = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
        Self { protobuf: content_type.starts_with("application/protobuf") }
    }

    fn decode<T: prost::Message + Default + DeserializeOwned>(&self, body: &[u8]) -> Result<T, Response> {
        let malformed = |e: String| twirp_error(StatusCode::BAD_REQUEST, "malformed", e);
        if self.protobuf { T::decode(body).map_err(|e| malformed(e.to_string())) } else { serde_json::from_slice(body).map_err(|e| malformed(e.to_string())) }
    }

    fn answer<T: prost::Message + Serialize>(&self, message: &T) -> Response {
        if self.protobuf {
            ([(CONTENT_TYPE, "application/protobuf")], message.encode_to_vec()).into_response()
        } else {
            axum::Json(serde_json::to_value(message).unwrap_or_default()).into_response()
        }
    }
}

pub async fn room_service(State(server): State<AppState>, Path(method): Path<String>, uri: axum::http::Uri, headers: HeaderMap, body: Bytes) -> Response {
    let encoding = Encoding::of(&headers);
    let bearer = headers.get(http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    let Some(token) = bearer else { return twirp_error(StatusCode::UNAUTHORIZED, "unauthenticated", "missing access token") };
    let claims = match server.calls.verify(token) {
        Ok(claims) => claims,
        Err(error) => return twirp_error(StatusCode::UNAUTHORIZED, "unauthenticated", error.to_string()),
    };
    // A therapist demoted or removed since the token was issued moderates no more.
    if let Err(error) = crate::calls::still_allowed(&server.rooms, &claims.matrix_room, &claims.matrix_user, claims.rights()) {
        let (_, _, message) = error.describe();
        return twirp_error(StatusCode::FORBIDDEN, "permission_denied", message);
    }
    if !claims.video.room_admin {
        return twirp_error(StatusCode::FORBIDDEN, "permission_denied", "only the call's moderators may do this");
    }
    // The call's participants are on the node that serves it: the request is answered there.
    let forwarded = match crate::calls::placement::serving_elsewhere(&*server, &claims.matrix_room, &headers) {
        Ok(None) => None,
        Ok(Some(url)) => Some(server.peers.forward(&url, axum::http::Method::POST, &uri, &headers, body.clone(), crate::calls::placement::FORWARD_TIMEOUT).await),
        Err(error) => Some(Err(error)),
    };
    match forwarded {
        None => {}
        Some(Ok(answer)) => return answer.map(axum::body::Body::from),
        Some(Err(error)) => return twirp_error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", error.describe().2),
    }
    let Some(sfu) = server.calls.sfu.get().cloned() else {
        return twirp_error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "calls are not running on this server");
    };
    let moderator = |room: &str| -> Result<(), Response> {
        if !claims.video.room_admin || claims.video.room != room {
            return Err(twirp_error(StatusCode::FORBIDDEN, "permission_denied", "only the call's moderators may do this"));
        }
        Ok(())
    };
    let stopped = || twirp_error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "the SFU has stopped");
    let not_found = |what: &str| twirp_error(StatusCode::NOT_FOUND, "not_found", format!("no such {what} in this call"));
    let result: Result<Response, Response> = async {
        match method.as_str() {
            "ListParticipants" => {
                let request: lk::ListParticipantsRequest = encoding.decode(&body)?;
                moderator(&request.room)?;
                let participants = sfu.run(move |sfu, _| sfu.participants_in(&request.room)).await.ok_or_else(stopped)?;
                Ok(encoding.answer(&lk::ListParticipantsResponse { participants }))
            }
            "MutePublishedTrack" => {
                let request: lk::MuteRoomTrackRequest = encoding.decode(&body)?;
                moderator(&request.room)?;
                if !request.muted {
                    return Err(twirp_error(StatusCode::FORBIDDEN, "permission_denied", "participants unmute themselves"));
                }
                let (room, identity, track_sid) = (request.room.clone(), request.identity.clone(), request.track_sid.clone());
                let track = sfu.run(move |sfu, now| sfu.mute_for(now, &room, &identity, &track_sid)).await.ok_or_else(stopped)?.ok_or_else(|| not_found("track"))?;
                tracing::info!(room = %claims.matrix_room, moderator = %claims.matrix_user, identity = %request.identity, track = %request.track_sid, "muted a participant's track");
                Ok(encoding.answer(&lk::MuteRoomTrackResponse { track: Some(track) }))
            }
            "RemoveParticipant" => {
                let request: lk::RoomParticipantIdentity = encoding.decode(&body)?;
                moderator(&request.room)?;
                let (room, identity) = (request.room.clone(), request.identity.clone());
                if !sfu.run(move |sfu, _| sfu.remove(&room, &identity)).await.ok_or_else(stopped)? {
                    return Err(not_found("participant"));
                }
                tracing::info!(room = %claims.matrix_room, moderator = %claims.matrix_user, identity = %request.identity, "removed a participant from a call");
                Ok(encoding.answer(&lk::RemoveParticipantResponse {}))
            }
            other => Err(twirp_error(StatusCode::NOT_FOUND, "bad_route", format!("RoomService has no method {other}"))),
        }
    }
    .await;
    result.unwrap_or_else(|refused| refused)
}
