//! The sessions API (`/_limbic/client/v1/sessions`) and therapist verification
//! (`/_limbic/admin/v1/therapists`). Sessions are ordinary rooms: everything here becomes state
//! events and memberships, which the clinic policy checks like any other event.

use axum::{
    Json, Router,
    extract::{FromRequestParts, Path, State},
    http::request::Parts,
    routing::get,
};
use ruma::{OwnedEventId, OwnedRoomId, OwnedUserId};
use serde::{Deserialize, Serialize};
use serde_json::Value as JsonValue;

use super::{
    AppState,
    admin::{Admin, QueryParams},
    authenticate, missing_token,
};
use crate::{
    clinic::{Role, Session, Status, appointments, notes, sessions::{self, NewSession}},
    error::{Error, Result},
    users::Caller,
};

pub(super) fn routes(router: Router<AppState>) -> Router<AppState> {
    const V1: &str = "/_limbic/client/v1/sessions";
    router
        .route(V1, get(list_sessions).post(create_session))
        .route(&format!("{V1}/{{room_id}}"), get(get_session).patch(update_session))
        .route(&format!("{V1}/{{room_id}}/waiting"), get(waiting_room))
        .route(&format!("{V1}/{{room_id}}/waiting/{{user_id}}/admit"), axum::routing::post(admit))
        .route(&format!("{V1}/{{room_id}}/waiting/{{user_id}}/decline"), axum::routing::post(decline))
        .route(&format!("{V1}/{{room_id}}/status"), axum::routing::put(set_status))
        .route(&format!("{V1}/{{room_id}}/participants/{{user_id}}"), axum::routing::put(set_participant).delete(remove_participant))
        .route(&format!("{V1}/{{room_id}}/links/{{user_id}}"), axum::routing::post(client_link))
        .route("/_limbic/client/v1/relationship", get(relationship))
        .route("/_limbic/client/v1/me", get(me))
        .route(&format!("{V1}/{{room_id}}/notes"), get(list_notes))
        .route(&format!("{V1}/{{room_id}}/transcript"), get(transcript))
        .route(&format!("{V1}/{{room_id}}/notes/{{note_id}}"), axum::routing::put(write_note))
        .route("/_limbic/admin/v1/therapists/{user_id}", get(get_therapist).put(set_therapist))
}

// --- response bodies (spec/openapi.json) ---

/// An empty JSON object, for operations whose answer is their success.
#[derive(Serialize)]
pub(super) struct Empty {}

/// `POST /sessions`.
#[derive(Serialize)]
struct Created {
    room_id: OwnedRoomId,
    session: Session,
}

/// `GET /sessions`.
#[derive(Serialize)]
struct SessionList {
    sessions: Vec<sessions::SessionView>,
}

/// `PUT /sessions/{roomId}/status` and `PATCH /sessions/{roomId}`.
#[derive(Serialize)]
struct Changed {
    event_id: OwnedEventId,
    session: Session,
}

/// `GET /sessions/{roomId}/waiting`.
#[derive(Serialize)]
struct WaitingRoom {
    waiting: Vec<sessions::Waiting>,
}

/// `POST …/waiting/{userId}/admit` and `…/decline`.
#[derive(Serialize)]
struct Answered {
    event_id: OwnedEventId,
}

/// `GET` and `PUT /_limbic/admin/v1/therapists/{userId}`.
#[derive(Serialize)]
struct Therapist {
    user_id: OwnedUserId,
    verified: bool,
}

/// `GET /sessions/{roomId}/notes`.
#[derive(Serialize)]
struct Notes {
    room_id: OwnedRoomId,
    notes: Vec<notes::Note>,
}

/// `PUT /sessions/{roomId}/notes/{noteId}`.
#[derive(Serialize)]
struct NoteWritten {
    event_id: OwnedEventId,
    room_id: OwnedRoomId,
}

/// `PUT /sessions/{roomId}/participants/{userId}`.
#[derive(Serialize)]
struct ParticipantRole {
    user_id: OwnedUserId,
    role: Role,
}

/// `GET /me`: who the caller is to the clinic, so that an app can show each person their own view.
#[derive(Serialize)]
struct Me {
    user_id: OwnedUserId,
    displayname: Option<String>,
    admin: bool,
    verified_therapist: bool,
}

/// `GET /relationship`.
#[derive(Serialize)]
struct Relationship {
    shared: bool,
    sessions: Vec<OwnedRoomId>,
}

/// An authenticated caller of a plain (non-ruma) endpoint.
pub(super) struct Authed(pub(super) Caller);

impl FromRequestParts<AppState> for Authed {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, server: &AppState) -> Result<Self> {
        Ok(Self(authenticate(server, parts)?.ok_or_else(missing_token)?))
    }
}

pub(super) fn parse_body<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T> {
    let value: JsonValue = serde_json::from_slice(body).map_err(|e| Error::new(crate::error::ErrorCode::NotJson, e.to_string()))?;
    serde_json::from_value(value).map_err(|e| Error::bad_json(e.to_string()))
}

pub(super) fn room_id(room: &str) -> Result<OwnedRoomId> {
    OwnedRoomId::try_from(room).map_err(|_| Error::invalid_param("invalid room id"))
}

/// Creates the session room in one atomic write: its state, the roles and the invitations.
async fn create_session(State(server): State<AppState>, Authed(caller): Authed, body: axum::body::Bytes) -> Result<Json<Created>> {
    let request: NewSession = parse_body(&body)?;
    let (room_id, session) = sessions::create(&server, &caller.user_id, request).await?;
    Ok(Json(Created { room_id, session }))
}

async fn get_session(State(server): State<AppState>, Authed(caller): Authed, Path(room): Path<String>) -> Result<Json<sessions::SessionView>> {
    Ok(Json(sessions::view(&server, &caller.user_id, &room_id(&room)?)?))
}

/// The caller's sessions that have not ended and are still live, soonest first.
/// `GET /sessions`: with `from` and `to`, a calendar's range.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SessionRange {
    from: Option<u64>,
    to: Option<u64>,
}

async fn list_sessions(State(server): State<AppState>, Authed(caller): Authed, QueryParams(range): QueryParams<SessionRange>) -> Result<Json<SessionList>> {
    let sessions = match (range.from, range.to) {
        (None, None) => sessions::upcoming(&server, &caller.user_id)?,
        (Some(from), Some(to)) => sessions::in_range(&server, &caller.user_id, from, to)?,
        _ => return Err(Error::invalid_param("`from` and `to` go together")),
    };
    Ok(Json(SessionList { sessions }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetStatus {
    status: Status,
}

async fn set_status(State(server): State<AppState>, Authed(caller): Authed, Path(room): Path<String>, body: axum::body::Bytes) -> Result<Json<Changed>> {
    let request: SetStatus = parse_body(&body)?;
    let (event_id, session) = sessions::set_status(&server, &caller.user_id, &room_id(&room)?, request.status).await?;
    Ok(Json(Changed { event_id, session }))
}

/// Reschedules or edits a session.
async fn update_session(State(server): State<AppState>, Authed(caller): Authed, Path(room): Path<String>, body: axum::body::Bytes) -> Result<Json<Changed>> {
    let changes: sessions::SessionChanges = parse_body(&body)?;
    let (event_id, session) = sessions::update(&server, &caller.user_id, &room_id(&room)?, changes).await?;
    Ok(Json(Changed { event_id, session }))
}

// --- the waiting room: Matrix knocks ---

/// Who is knocking, oldest first; for the session's therapists.
async fn waiting_room(State(server): State<AppState>, Authed(caller): Authed, Path(room): Path<String>) -> Result<Json<WaitingRoom>> {
    Ok(Json(WaitingRoom { waiting: sessions::waiting(&server, &caller.user_id, &room_id(&room)?)? }))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Decline {
    reason: Option<String>,
}

async fn answer_knock(server: &AppState, caller: &Caller, room: &str, user: &str, answer: sessions::Answer) -> Result<Json<Answered>> {
    let event_id = sessions::answer_knock(server, &caller.user_id, &room_id(room)?, &user_id(user)?, answer).await?;
    Ok(Json(Answered { event_id }))
}

async fn admit(State(server): State<AppState>, Authed(caller): Authed, Path((room, user)): Path<(String, String)>) -> Result<Json<Answered>> {
    answer_knock(&server, &caller, &room, &user, sessions::Answer::Admit).await
}

async fn decline(State(server): State<AppState>, Authed(caller): Authed, Path((room, user)): Path<(String, String)>, body: axum::body::Bytes) -> Result<Json<Answered>> {
    let request: Decline = if body.is_empty() { Decline::default() } else { parse_body(&body)? };
    answer_knock(&server, &caller, &room, &user, sessions::Answer::Decline { reason: request.reason }).await
}

/// Only server admins see and mark therapists as verified.
async fn get_therapist(State(server): State<AppState>, _admin: Admin, Path(user): Path<String>) -> Result<Json<Therapist>> {
    let user_id = user_id(&user)?;
    let verified = server.clinic.is_verified_therapist(&user_id)?;
    Ok(Json(Therapist { user_id, verified }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetTherapist {
    verified: bool,
}

async fn set_therapist(State(server): State<AppState>, Admin(admin): Admin, Path(user): Path<String>, body: axum::body::Bytes) -> Result<Json<Therapist>> {
    let request: SetTherapist = parse_body(&body)?;
    let user_id = user_id(&user)?;
    if !server.users.account(&user_id)?.is_some_and(|a| !a.deactivated) {
        return Err(Error::not_found("unknown user"));
    }
    server.clinic.set_verified_therapist(&server.audit, &admin, &user_id, request.verified)?;
    Ok(Json(Therapist { user_id, verified: request.verified }))
}

// --- clinical notes ---

/// Every note with its earlier versions, newest version first; the read is audited.
async fn list_notes(State(server): State<AppState>, Authed(caller): Authed, Path(room): Path<String>) -> Result<Json<Notes>> {
    let (room_id, notes) = notes::list(&server, &caller.user_id, &room_id(&room)?).await?;
    Ok(Json(Notes { room_id, notes }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WriteNote {
    body: String,
}

/// Creates or edits a note; the earlier versions stay in the notes room's history.
async fn write_note(
    State(server): State<AppState>,
    Authed(caller): Authed,
    Path((room, note_id)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Result<Json<NoteWritten>> {
    let request: WriteNote = parse_body(&body)?;
    let (event_id, room_id) = notes::write(&server, &caller.user_id, &room_id(&room)?, &note_id, request.body).await?;
    Ok(Json(NoteWritten { event_id, room_id }))
}

// --- participants ---

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetParticipant {
    role: Role,
}

pub(super) fn user_id(user: &str) -> Result<OwnedUserId> {
    OwnedUserId::try_from(user).map_err(|_| Error::invalid_param("invalid user id"))
}

/// Adds a participant or changes their role.
async fn set_participant(
    State(server): State<AppState>,
    Authed(caller): Authed,
    Path((room, user)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Result<Json<ParticipantRole>> {
    let request: SetParticipant = parse_body(&body)?;
    let user_id = user_id(&user)?;
    sessions::set_participant(&server, &caller.user_id, &room_id(&room)?, &user_id, request.role).await?;
    Ok(Json(ParticipantRole { user_id, role: request.role }))
}

/// Removes a participant from the session, its notes room and its breakouts.
async fn remove_participant(State(server): State<AppState>, Authed(caller): Authed, Path((room, user)): Path<(String, String)>) -> Result<Json<Empty>> {
    sessions::remove_participant(&server, &caller.user_id, &room_id(&room)?, &user_id(&user)?).await?;
    Ok(Json(Empty {}))
}

#[derive(Deserialize)]
struct RelationshipQuery {
    therapist: OwnedUserId,
    client: OwnedUserId,
}

/// A sign-in link for one of the session's clients, made by one of its therapists.
async fn client_link(State(server): State<AppState>, Authed(caller): Authed, Path((room, user)): Path<(String, String)>) -> Result<Json<appointments::ClientLink>> {
    Ok(Json(appointments::link_for_client(&*server, &caller.user_id, &room_id(&room)?, &user_id(&user)?)?))
}

/// The caller's own account as the clinic sees it: only ever the caller's.
async fn me(State(server): State<AppState>, Authed(caller): Authed) -> Result<Json<Me>> {
    let displayname = server.users.account(&caller.user_id)?.and_then(|account| account.displayname);
    Ok(Json(Me {
        admin: server.users.is_admin(&caller.user_id)?,
        verified_therapist: server.clinic.is_verified_therapist(&caller.user_id)?,
        user_id: caller.user_id,
        displayname,
    }))
}

/// Do therapist T and client C share a session? For T, C and server admins.
async fn relationship(
    State(server): State<AppState>,
    Authed(caller): Authed,
    QueryParams(query): QueryParams<RelationshipQuery>,
) -> Result<Json<Relationship>> {
    let admin = server.users.is_admin(&caller.user_id)?;
    if caller.user_id != query.therapist && caller.user_id != query.client && !admin {
        return Err(Error::forbidden("only the two users or a server admin may ask"));
    }
    let sessions = sessions::shared(&server, &query.therapist, &query.client)?;
    Ok(Json(Relationship { shared: !sessions.is_empty(), sessions }))
}

// --- transcript export ---

#[derive(Deserialize)]
struct TranscriptQuery {
    #[serde(default)]
    format: Option<String>,
}

/// The session's chat as Markdown (default) or plain text; therapists only, audited.
async fn transcript(
    State(server): State<AppState>,
    Authed(caller): Authed,
    Path(room): Path<String>,
    QueryParams(query): QueryParams<TranscriptQuery>,
) -> Result<axum::response::Response> {
    let (format, out) = notes::transcript(&server, &caller.user_id, &room_id(&room)?, query.format.as_deref())?;
    let content_type = if format == notes::TranscriptFormat::Markdown { "text/markdown; charset=utf-8" } else { "text/plain; charset=utf-8" };
    Ok(axum::response::IntoResponse::into_response(([(http::header::CONTENT_TYPE, content_type)], out)))
}
