//! LiveKit's signalling endpoints: `/rtc` (a WebSocket of protobuf `SignalRequest` and
//! `SignalResponse` frames; two peer connections per participant), `/rtc/v1` (the same with
//! one peer connection, the join request in the URL), and their `/validate`.

use std::time::Instant;

use axum::{
    extract::{
        Query, State,
        ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code},
    },
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use livekit_protocol as lk;
use prost::Message as _;
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::{
    Server,
    calls::{Claims, media::{Resumption, ToParticipant}, placement::Served, sfu::{Bucket, JoinOptions}, still_allowed},
    error::{Error, ErrorCode},
};

type AppState = std::sync::Arc<Server>;

#[derive(Deserialize)]
pub struct RtcQuery {
    access_token: Option<String>,
    auto_subscribe: Option<String>,
    reconnect: Option<String>,
    /// The participant sid a reconnecting SDK resumes.
    sid: Option<String>,
    /// `/rtc/v1`: a `WrappedJoinRequest`, base64url.
    join_request: Option<String>,
}

/// Why `/rtc/v1`'s join request could not be read.
#[derive(Debug, thiserror::Error)]
pub enum UnreadableJoinRequest {
    #[error("more than {0} bytes")]
    TooLong(usize),
    #[error("not base64url: {0}")]
    Base64(#[from] base64::DecodeError),
    #[error("not a join request: {0}")]
    Protobuf(#[from] prost::DecodeError),
    #[error("not gzip: {0}")]
    Gzip(#[from] std::io::Error),
}

/// `/rtc/v1`'s `join_request`: a `WrappedJoinRequest` in base64url (padded, as LiveKit's SDKs
/// send it, or not), whose `JoinRequest` may be gzipped. Bounded as signalling messages are
/// (`largest`), encoded and inflated: a small gzip that inflates beyond it is refused once it
/// has, not read to its end.
pub fn decode_join_request(encoded: &str, largest: usize) -> Result<lk::JoinRequest, UnreadableJoinRequest> {
    use base64::Engine as _;
    use std::io::Read as _;
    if encoded.len() > largest.saturating_mul(2) {
        return Err(UnreadableJoinRequest::TooLong(largest));
    }
    let wrapped = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(encoded.trim_end_matches('='))?;
    let wrapped = lk::WrappedJoinRequest::decode(wrapped.as_slice())?;
    let bytes = if wrapped.compression == lk::wrapped_join_request::Compression::Gzip as i32 {
        let mut bytes = Vec::new();
        flate2::read::GzDecoder::new(wrapped.join_request.as_slice()).take(largest as u64 + 1).read_to_end(&mut bytes)?;
        if bytes.len() > largest {
            return Err(UnreadableJoinRequest::TooLong(largest));
        }
        bytes
    } else {
        wrapped.join_request
    };
    Ok(lk::JoinRequest::decode(bytes.as_slice())?)
}

/// How a client joins or resumes: from `/rtc`'s query, or from `/rtc/v1`'s join request.
struct Joining {
    reconnect: bool,
    /// The participant sid a reconnecting SDK resumes.
    sid: Option<String>,
    auto_subscribe: bool,
    single_connection: bool,
    /// `/rtc/v1`: the client's first offer.
    offer: Option<lk::SessionDescription>,
}

impl Joining {
    fn of_query(query: &RtcQuery) -> Self {
        Self {
            reconnect: query.reconnect.as_deref() == Some("1"),
            sid: query.sid.clone(),
            auto_subscribe: query.auto_subscribe.as_deref() != Some("0"),
            single_connection: false,
            offer: None,
        }
    }

    /// `/rtc/v1`'s join request ([`decode_join_request`]). Without connection settings,
    /// nothing is subscribed to automatically (as LiveKit has it).
    fn of_join_request(query: &RtcQuery, largest: usize) -> Result<Self, Response> {
        let Some(encoded) = query.join_request.as_deref() else {
            return Err((StatusCode::BAD_REQUEST, "join_request is required").into_response());
        };
        let request = decode_join_request(encoded, largest).map_err(|error| (StatusCode::BAD_REQUEST, format!("unreadable join_request: {error}")).into_response())?;
        Ok(Self {
            reconnect: request.reconnect,
            sid: Some(request.participant_sid).filter(|sid| !sid.is_empty()),
            auto_subscribe: request.connection_settings.is_some_and(|settings| settings.auto_subscribe),
            single_connection: true,
            offer: request.publisher_offer,
        })
    }
}

/// The call token, from `Authorization: Bearer` (LiveKit's Rust and Python SDKs) or
/// `?access_token=` (the JavaScript SDK), if it is valid and its holder still has the rights
/// it grants (a token outlives a kick or the session's end).
fn claims(server: &Server, headers: &HeaderMap, query: &RtcQuery) -> Result<Claims, Response> {
    let bearer = headers.get(http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    let Some(token) = bearer.or(query.access_token.as_deref()) else {
        return Err((StatusCode::UNAUTHORIZED, "missing access token").into_response());
    };
    let claims = server.calls.verify(token).map_err(|error| (StatusCode::UNAUTHORIZED, error.to_string()).into_response())?;
    still_allowed(&server.rooms, &claims.matrix_room, &claims.matrix_user, claims.rights()).map_err(refused)?;
    Ok(claims)
}

/// Refused unless this node serves the token's call (spec/calls.md, "Calls across nodes"): the
/// token names another node, or the call is placed on another live one. The SDK then needs a
/// new token, which names the call's node. `joining`: the call is placed here now if it was
/// nowhere (or its node died); `/rtc/validate` only looks.
async fn served_here(server: &Server, claims: &Claims, joining: bool) -> Result<(), Response> {
    let elsewhere = |node: &str| refused(Error::forbidden(format!("this call is served by {node}; a new call token names it")));
    if let Some(node) = &claims.node
        && Some(node.as_str()) != server.calls.placements.node()
    {
        return Err(elsewhere(&format!("node {node}")));
    }
    if !joining {
        let home = crate::calls::call_home(&server.rooms, &claims.matrix_room).map_err(refused)?;
        return match server.calls.placements.elsewhere(&home).map_err(refused)? {
            Some(_) => Err(elsewhere("another node")),
            None => Ok(()),
        };
    }
    match crate::calls::placement::admit(server, &claims.matrix_room).await.map_err(refused)? {
        Served::Here { .. } => Ok(()),
        Served::Elsewhere { node } => Err(elsewhere(&format!("node {node}"))),
    }
}

/// A refusal as LiveKit's clients show it: the status, and the reason as text.
fn refused(error: crate::error::Error) -> Response {
    let (status, errcode, message) = error.describe();
    (status, format!("{errcode}: {message}")).into_response()
}

/// Refused when the token's call already has `[calls] max_participants_per_call` participants
/// (the SFU refuses them too, should the call fill up meanwhile).
async fn room_in_call(server: &Server, sfu: &crate::calls::media::SfuHandle, claims: &Claims) -> Result<(), Response> {
    let room = claims.video.room.clone();
    if sfu.run(move |sfu, _| sfu.is_full(&room)).await != Some(true) {
        return Ok(());
    }
    let limit = server.calls.config.max_participants_per_call;
    let message = format!("this call is full (at most {limit} participants)");
    Err(refused(Error::Matrix { code: ErrorCode::ResourceLimitExceeded, message, status: StatusCode::FORBIDDEN }))
}

pub async fn validate(State(server): State<AppState>, headers: HeaderMap, Query(query): Query<RtcQuery>) -> Response {
    check(&server, &headers, &query).await
}

/// `/rtc/v1/validate`: as `/rtc/validate`, and the join request must be readable.
pub async fn validate_v1(State(server): State<AppState>, headers: HeaderMap, Query(query): Query<RtcQuery>) -> Response {
    let checked = check(&server, &headers, &query).await;
    if checked.status() != StatusCode::OK {
        return checked;
    }
    match Joining::of_join_request(&query, server.calls.config.max_signal_message_bytes) {
        Ok(_) => checked,
        Err(refused) => refused,
    }
}

/// Whether the client would be let into its call now: 200 `success`, or why not.
async fn check(server: &Server, headers: &HeaderMap, query: &RtcQuery) -> Response {
    let claims = match claims(server, headers, query) {
        Ok(claims) => claims,
        Err(refused) => return refused,
    };
    if let Err(refused) = served_here(server, &claims, false).await {
        return refused;
    }
    if let Some(sfu) = server.calls.sfu.get()
        && let Err(refused) = room_in_call(server, sfu, &claims).await
    {
        return refused;
    }
    (StatusCode::OK, "success").into_response()
}

/// What a signalling WebSocket reads and writes through.
const SIGNAL_BUFFER_BYTES: usize = 8 * 1024;

pub async fn rtc(State(server): State<AppState>, headers: HeaderMap, Query(query): Query<RtcQuery>, upgrade: WebSocketUpgrade) -> Response {
    let claims = match claims(&server, &headers, &query) {
        Ok(claims) => claims,
        Err(refused) => return refused,
    };
    connect(server, claims, Joining::of_query(&query), upgrade).await
}

/// `/rtc/v1`: LiveKit's single peer connection, the join request (with the client's first
/// offer) in the URL.
pub async fn rtc_v1(State(server): State<AppState>, headers: HeaderMap, Query(query): Query<RtcQuery>, upgrade: WebSocketUpgrade) -> Response {
    let claims = match claims(&server, &headers, &query) {
        Ok(claims) => claims,
        Err(refused) => return refused,
    };
    match Joining::of_join_request(&query, server.calls.config.max_signal_message_bytes) {
        Ok(joining) => connect(server, claims, joining, upgrade).await,
        Err(refused) => refused,
    }
}

/// A join (or a resume) of the holder of `claims`, on a signalling WebSocket.
async fn connect(server: AppState, claims: Claims, joining: Joining, upgrade: WebSocketUpgrade) -> Response {
    let Some(sfu) = server.calls.sfu.get().cloned() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "calls are not running on this server").into_response();
    };
    if let Err(refused) = served_here(&server, &claims, true).await {
        return refused;
    }
    let reconnect = joining.reconnect;
    // A resuming participant is still counted in their call.
    if !reconnect
        && let Err(refused) = room_in_call(&server, &sfu, &claims).await
    {
        return refused;
    }
    // A recorded call goes on only while everyone in it consents.
    let room = claims.matrix_room.clone();
    let recorded = sfu.run(move |sfu, _| sfu.is_recording(room.as_str())).await == Some(true);
    if recorded
        && let Ok(user) = ruma::OwnedUserId::try_from(claims.matrix_user.as_str())
        && !crate::calls::recording::consented(&*server, &claims.matrix_room, user.as_str()).unwrap_or(false)
    {
        crate::calls::recording::stop_without_consent(&*server, &claims.matrix_room, &user, true).await;
    }
    let resumed_sid = joining.sid.clone().filter(|_| reconnect);
    // Bigger messages are refused before they are read in.
    let largest = server.calls.config.max_signal_message_bytes;
    // Signalling messages are small: tungstenite's 128 KiB buffers per connection are not
    // needed (a bigger message still grows them while it is read or written).
    let upgrade = upgrade.read_buffer_size(SIGNAL_BUFFER_BYTES).write_buffer_size(SIGNAL_BUFFER_BYTES);
    upgrade.max_message_size(largest).max_frame_size(largest).on_upgrade(move |socket| async move {
        match resumed_sid {
            Some(sid) => resume(socket, &server, sfu, claims, sid, joining.single_connection).await,
            None if reconnect => refuse_resume(socket).await,
            None => session(socket, &server, sfu, claims, joining).await,
        }
    })
}

/// Whether reading failed on a message (or frame) over `max_signal_message_bytes`, after which
/// the client still listens. The error is tungstenite's, which this crate does not name: its
/// text is what there is (tests/calls.rs checks the close code this leads to).
fn too_big(error: &axum::Error) -> bool {
    error.to_string().contains("Message too long")
}

/// Ends a signalling connection that broke a limit: LiveKit's `leave` (so that SDKs do not
/// reconnect), then the WebSocket close with its code and reason.
async fn close(socket: &mut WebSocket, code: u16, reason: &'static str) {
    let leave = lk::LeaveRequest { reason: lk::DisconnectReason::SignalClose as i32, action: lk::leave_request::Action::Disconnect as i32, ..Default::default() };
    leave_and_close(socket, leave, Some(CloseFrame { code, reason: reason.into() })).await;
}

/// There is nothing to resume: the SDK is told to join afresh.
async fn refuse_resume(mut socket: WebSocket) {
    let leave = lk::LeaveRequest {
        can_reconnect: true,
        reason: lk::DisconnectReason::StateMismatch as i32,
        action: lk::leave_request::Action::Reconnect as i32,
        ..Default::default()
    };
    leave_and_close(&mut socket, leave, None).await;
}

/// Sends `leave` and the close frame. Closing with the client's messages still unread would
/// reset the connection, and a reset can discard both before the client reads them: so it then
/// reads (and drops) until their close frame, for at most `CLOSE_GRACE`.
async fn leave_and_close(socket: &mut WebSocket, leave: lk::LeaveRequest, frame: Option<CloseFrame>) {
    let response = lk::SignalResponse { message: Some(lk::signal_response::Message::Leave(leave)) };
    let _ = socket.send(Message::Binary(response.encode_to_vec().into())).await;
    let _ = socket.send(Message::Close(frame)).await;
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        while let Some(Ok(message)) = socket.recv().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

/// How long a connection the server closes waits for the client's close frame.
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// The TURN servers a participant may relay through, with credentials of their own.
fn ice_servers(server: &Server, user: &str) -> Vec<lk::IceServer> {
    server.calls.turn.credentials(user).map(|c| lk::IceServer { urls: c.uris, username: c.username, credential: c.password }).into_iter().collect()
}

async fn session(socket: WebSocket, server: &Server, sfu: crate::calls::media::SfuHandle, claims: Claims, joining: Joining) {
    let (to, from_sfu) = mpsc::unbounded_channel();
    let single_connection = joining.single_connection;
    let options = JoinOptions { auto_subscribe: joining.auto_subscribe, ice_servers: ice_servers(server, &claims.matrix_user), single_connection, offer: joining.offer };
    let connection = to.downgrade();
    let Some(id) = sfu.join(claims.grant(), options, to).await else { return };
    tracing::info!(room = %claims.matrix_room, identity = %claims.sub, participant = id, single_connection, "joined a call");
    converse(socket, server, &sfu, &claims, id, (connection, from_sfu)).await;
}

/// LiveKit's resume: the participant `sid` (of this token's identity and call) goes on over
/// this connection, or, if they are gone, is told to join afresh.
async fn resume(socket: WebSocket, server: &Server, sfu: crate::calls::media::SfuHandle, claims: Claims, sid: String, single_connection: bool) {
    let (to, from_sfu) = mpsc::unbounded_channel();
    let resumption = Resumption { room: claims.video.room.clone(), identity: claims.sub.clone(), sid, single_connection, ice_servers: ice_servers(server, &claims.matrix_user) };
    let connection = to.downgrade();
    let Some(id) = sfu.resume(resumption, to).await else {
        refuse_resume(socket).await;
        return;
    };
    tracing::info!(room = %claims.matrix_room, identity = %claims.sub, participant = id, "resumed a call");
    converse(socket, server, &sfu, &claims, id, (connection, from_sfu)).await;
}

/// How a signalling connection ended.
enum Ended {
    /// The participant left, broke a limit, or the SFU let them go.
    Left,
    /// The connection dropped: they may resume.
    Dropped,
    /// They resumed on another connection (this one's channel was replaced), or the SFU stopped.
    Superseded,
}

/// A connection's channel from the SFU, and a handle the SFU knows it by.
type Channel = (mpsc::WeakUnboundedSender<ToParticipant>, mpsc::UnboundedReceiver<ToParticipant>);

/// Relays a participant's signalling both ways until the connection ends.
async fn converse(mut socket: WebSocket, server: &Server, sfu: &crate::calls::media::SfuHandle, claims: &Claims, id: crate::calls::sfu::ParticipantId, (connection, mut from_sfu): Channel) {
    let (room, identity, user, rights) = (&claims.matrix_room, &claims.sub, &claims.matrix_user, claims.rights());
    // Checked again now that the SFU knows them: rights that ended between the check before the
    // upgrade and the join were not seen by the warden, which looks only at who is in a call.
    if let Err(error) = still_allowed(&server.rooms, room, user, rights) {
        tracing::info!(%room, %identity, participant = id, %error, "dropped from a call: its rights ended");
        sfu.run(move |sfu, _| sfu.disconnect(id, lk::DisconnectReason::ParticipantRemoved)).await;
    }
    let mut budget = Bucket::new(crate::calls::sfu_rate(server.calls.config.signal_rate), Instant::now());
    let every = server.calls.refresh_interval();
    let mut refresh = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    let ended = loop {
        tokio::select! {
            _ = refresh.tick() => {
                // Only while their rights last: the warden drops them when those end.
                if still_allowed(&server.rooms, room, user, rights).is_ok()
                    && let Some(token) = refreshed_token(server, claims)
                {
                    let response = lk::SignalResponse { message: Some(lk::signal_response::Message::RefreshToken(token)) };
                    if socket.send(Message::Binary(response.encode_to_vec().into())).await.is_err() {
                        break Ended::Dropped;
                    }
                }
            },
            incoming = socket.recv() => {
                let message = match incoming {
                    Some(Ok(message)) => message,
                    Some(Err(error)) => {
                        if too_big(&error) {
                            tracing::info!(%room, %identity, participant = id, %error, "closed a call's signalling: a message over the limit");
                            close(&mut socket, close_code::SIZE, "signalling message too big").await;
                            break Ended::Left;
                        }
                        break Ended::Dropped;
                    }
                    None => break Ended::Dropped,
                };
                // Every message counts, pings too: each one costs the server work.
                if !budget.take(1.0, Instant::now()) {
                    tracing::info!(%room, %identity, participant = id, "closed a call's signalling: too many messages");
                    close(&mut socket, close_code::POLICY, "too many signalling messages").await;
                    break Ended::Left;
                }
                match message {
                    Message::Binary(bytes) => match lk::SignalRequest::decode(bytes.as_ref()) {
                        Ok(request) => sfu.signal(id, request),
                        Err(error) => tracing::debug!(participant = id, %error, "an unreadable signalling request"),
                    },
                    Message::Close(_) => break Ended::Dropped,
                    _ => {}
                }
            },
            outgoing = from_sfu.recv() => match outgoing {
                Some(ToParticipant::Signal(response)) => {
                    if socket.send(Message::Binary(response.encode_to_vec().into())).await.is_err() {
                        break Ended::Dropped;
                    }
                }
                Some(ToParticipant::Close) => break Ended::Left,
                None => break Ended::Superseded,
            },
        }
    };
    match ended {
        // A `leave` they sent has already ended the participation; otherwise they may resume.
        Ended::Dropped => {
            sfu.detach(id, connection);
            tracing::info!(%room, %identity, participant = id, "a call's signalling dropped; the participant may resume");
        }
        Ended::Left => {
            sfu.leave(id);
            tracing::info!(%room, %identity, participant = id, "left a call");
        }
        Ended::Superseded => {}
    }
}

fn refreshed_token(server: &Server, claims: &Claims) -> Option<String> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).ok()?.as_secs();
    server.calls.refresh(claims, now).inspect_err(|error| tracing::warn!(%error, "could not refresh a call token")).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use std::io::Write as _;

    fn encoded(join_request: Vec<u8>, compression: lk::wrapped_join_request::Compression) -> String {
        base64::engine::general_purpose::URL_SAFE.encode(lk::WrappedJoinRequest { compression: compression as i32, join_request }.encode_to_vec())
    }

    fn gzipped(bytes: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    }

    #[test]
    fn a_join_request_is_read_gzipped_or_not_padded_or_not_and_bounded_inflated() {
        use lk::wrapped_join_request::Compression;
        let request = lk::JoinRequest { reconnect: true, participant_sid: "PA_x".into(), ..Default::default() };
        for text in [encoded(request.encode_to_vec(), Compression::None), encoded(gzipped(&request.encode_to_vec()), Compression::Gzip)] {
            assert_eq!(decode_join_request(&text, 1024).unwrap(), request);
            assert_eq!(decode_join_request(text.trim_end_matches('='), 1024).unwrap(), request);
        }
        // 2 MiB of metadata gzip to a few KB: refused once 1 MiB is inflated.
        let big = lk::JoinRequest { metadata: "x".repeat(2 << 20), ..Default::default() }.encode_to_vec();
        let bomb = encoded(gzipped(&big), Compression::Gzip);
        assert!(bomb.len() < 16 * 1024, "{}", bomb.len());
        assert!(matches!(decode_join_request(&bomb, 1 << 20), Err(UnreadableJoinRequest::TooLong(_))));
        assert!(matches!(decode_join_request(&"A".repeat(3 << 20), 1 << 20), Err(UnreadableJoinRequest::TooLong(_))));
        assert!(matches!(decode_join_request("%%%", 1024), Err(UnreadableJoinRequest::Base64(_))));
        assert!(matches!(decode_join_request(&encoded(vec![0xff; 4], Compression::None), 1024), Err(UnreadableJoinRequest::Protobuf(_))));
        assert!(matches!(decode_join_request(&encoded(vec![1, 2, 3], Compression::Gzip), 1024), Err(UnreadableJoinRequest::Gzip(_))));
    }
}
