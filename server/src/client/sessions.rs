//! The sessions API (`/_limbic/client/v1/sessions`) and therapist verification
//! (`/_limbic/admin/v1/therapists`). Sessions are ordinary rooms: everything here becomes state
//! events and memberships, which the clinic policy checks like any other event.

use axum::{
    Json, Router,
    extract::{FromRequestParts, Path, State},
    http::request::Parts,
    routing::get,
};
use ruma::{OwnedRoomId, OwnedUserId, RoomVersionId};
use serde::Deserialize;
use serde_json::{Value as JsonValue, json};

use super::{
    AppState,
    admin::{Admin, QueryParams},
    authenticate, missing_token,
};
use crate::{
    audit::AuditRecord,
    clinic::{CALL_MEMBER, HAND, Kind, NOTE, NOTES_FOR, RECORDING, RECORDING_CONSENT, ROLE, RecordingPolicy, Role, SESSION, Session, Status, role_key, role_user, subrooms::stage_role_change},
    error::{Error, Result},
    events::PduBuilder,
    rooms::Membership,
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
        .route("/_limbic/client/v1/relationship", get(relationship))
        .route(&format!("{V1}/{{room_id}}/notes"), get(list_notes))
        .route(&format!("{V1}/{{room_id}}/transcript"), get(transcript))
        .route(&format!("{V1}/{{room_id}}/notes/{{note_id}}"), axum::routing::put(write_note))
        .route("/_limbic/admin/v1/therapists/{user_id}", get(get_therapist).put(set_therapist))
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Participant {
    pub(super) user_id: OwnedUserId,
    pub(super) role: Role,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateSession {
    pub(super) kind: Kind,
    pub(super) title: String,
    pub(super) starts_at: u64,
    pub(super) ends_at: u64,
    pub(super) timezone: String,
    #[serde(default)]
    pub(super) participants: Vec<Participant>,
    #[serde(default)]
    pub(super) recording_policy: RecordingPolicy,
    pub(super) max_participants: Option<u32>,
    pub(super) join_window_minutes: Option<u32>,
    /// Knocks and joins then need it; only its argon2 hash is kept.
    #[serde(default)]
    pub(super) passcode: Option<String>,
}

fn power_levels(therapist: &OwnedUserId, participants: &[Participant]) -> JsonValue {
    let mut users = serde_json::Map::new();
    users.insert(therapist.to_string(), json!(Role::Therapist.power_level()));
    for p in participants.iter().filter(|p| p.role.power_level() > 0) {
        users.insert(p.user_id.to_string(), json!(p.role.power_level()));
    }
    let therapists_only = Role::CoTherapist.power_level();
    json!({
        "users": users,
        "users_default": 0,
        "events_default": 0,
        "state_default": therapists_only,
        // Participants publish their own MatrixRTC call membership, recording consent and
        // raised hand (the clinic rules keep each to its owner).
        "events": { SESSION: therapists_only, ROLE: therapists_only, RECORDING: therapists_only, CALL_MEMBER: 0, RECORDING_CONSENT: 0, HAND: 0, "m.room.power_levels": 100 },
        "invite": therapists_only,
        "kick": therapists_only,
        "ban": therapists_only,
        "redact": therapists_only,
    })
}

/// Creates the session room in one atomic write: its state, the roles and the invitations.
async fn create_session(State(server): State<AppState>, Authed(caller): Authed, body: axum::body::Bytes) -> Result<Json<JsonValue>> {
    let request: CreateSession = parse_body(&body)?;
    let (writer, session) = stage_session(&server, &caller.user_id, request).await?;
    let room_id = writer.room_id().clone();
    writer.commit()?;
    Ok(Json(json!({ "room_id": room_id, "session": session })))
}

/// Stages a new session room with `therapist` as its therapist: its state, the roles and the
/// invitations, in a writer the caller commits (with records of its own, if any).
pub(super) async fn stage_session<'s>(
    server: &'s AppState,
    therapist: &OwnedUserId,
    request: CreateSession,
) -> Result<(crate::rooms::RoomWriter<'s>, Session)> {
    let therapist = therapist.clone();
    if request.participants.iter().any(|p| p.user_id == therapist) {
        return Err(Error::bad_json("the creating therapist is a participant already"));
    }
    for p in &request.participants {
        if p.user_id.server_name() == server.server_name() && !server.users.exists(&p.user_id)? {
            return Err(Error::not_found(format!("unknown user {}", p.user_id)));
        }
    }
    let session = Session {
        kind: request.kind,
        title: request.title,
        starts_at: request.starts_at,
        ends_at: request.ends_at,
        timezone: request.timezone,
        status: Status::Scheduled,
        max_participants: request.max_participants.unwrap_or_else(|| server.clinic.kind_limit(request.kind)),
        join_window_minutes: request.join_window_minutes.unwrap_or(15),
        recording_policy: request.recording_policy,
    };
    let account = server.users.account(&therapist)?.ok_or_else(|| Error::forbidden("unknown user"))?;
    let mut member = json!({ "membership": "join", "displayname": account.displayname });
    super::account::strip_nulls(&mut member);

    let mut events = vec![
        PduBuilder::state("m.room.create", "", json!({ "room_version": "11" })),
        PduBuilder::state("m.room.member", therapist.as_str(), member),
        PduBuilder::state("m.room.power_levels", "", power_levels(&therapist, &request.participants)),
        PduBuilder::state("m.room.join_rules", "", json!({ "join_rule": "knock" })),
        PduBuilder::state("m.room.history_visibility", "", json!({ "history_visibility": "shared" })),
        PduBuilder::state("m.room.guest_access", "", json!({ "guest_access": "forbidden" })),
        PduBuilder::state("m.room.name", "", json!({ "name": session.title })),
        PduBuilder::state(SESSION, "", serde_json::to_value(&session).map_err(Error::internal)?),
        PduBuilder::state(ROLE, role_key(therapist.as_str()), json!({ "role": Role::Therapist })),
    ];
    for p in &request.participants {
        events.push(PduBuilder::state(ROLE, role_key(p.user_id.as_str()), json!({ "role": p.role })));
    }
    for p in &request.participants {
        events.push(PduBuilder::state("m.room.member", p.user_id.as_str(), json!({ "membership": "invite" })));
    }

    let mut writer = server.rooms.new_room(RoomVersionId::V11, &therapist, events).await?;
    let room_id = writer.room_id().clone();
    if let Some(passcode) = request.passcode.as_deref().filter(|p| !p.is_empty()) {
        let clinic = &server.clinic;
        clinic.stage_passcode(writer.batch(), &room_id, passcode)?;
    }
    Ok((writer, session))
}

/// The session's content and roles; for its members and participants only.
pub(super) fn session_view(server: &AppState, caller: &Caller, room_id: &ruma::RoomId) -> Result<(Session, JsonValue)> {
    let content = server.rooms.state_content(room_id, SESSION, "")?.ok_or_else(|| Error::not_found("not a session"))?;
    let role = crate::clinic::session_role(&server.rooms, room_id, caller.user_id.as_str())?;
    // Members, invitees and those waiting may look; those who left or were declined may not.
    let member = matches!(
        server.rooms.membership(room_id, &caller.user_id)?,
        Some(Membership::Join | Membership::Invite | Membership::Knock)
    );
    if role.is_none() && !member {
        return Err(Error::not_found("not a session"));
    }
    let session = Session::parse(&content)?;
    let roles: serde_json::Map<String, JsonValue> = server
        .rooms
        .current_state(room_id)?
        .into_iter()
        .filter(|pdu| pdu.kind.to_string() == ROLE)
        .filter_map(|pdu| Some((role_user(pdu.state_key.as_deref()?)?.to_owned(), json!(Role::of(&pdu.content_json())?))))
        .collect();
    let now: u64 = ruma::MilliSecondsSinceUnixEpoch::now().0.into();
    let join_window = json!({ "opens_at": session.join_opens_at(), "closes_at": session.ends_at, "open": session.join_window_open(now) });
    Ok((session.clone(), json!({ "room_id": room_id, "session": session, "roles": roles, "join_window": join_window })))
}

async fn get_session(State(server): State<AppState>, Authed(caller): Authed, Path(room): Path<String>) -> Result<Json<JsonValue>> {
    Ok(Json(session_view(&server, &caller, &room_id(&room)?)?.1))
}

/// The caller's sessions that have not ended and are still live, soonest first.
async fn list_sessions(State(server): State<AppState>, Authed(caller): Authed) -> Result<Json<JsonValue>> {
    let now: u64 = ruma::MilliSecondsSinceUnixEpoch::now().0.into();
    let mut sessions = Vec::new();
    for (room_id, _) in server.rooms.user_rooms(&caller.user_id)? {
        let Ok((session, view)) = session_view(&server, &caller, &room_id) else { continue };
        if session.status.is_live() && session.ends_at > now {
            sessions.push((session.starts_at, view));
        }
    }
    sessions.sort_by_key(|(starts, _)| *starts);
    Ok(Json(json!({ "sessions": sessions.into_iter().map(|(_, v)| v).collect::<Vec<_>>() })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetStatus {
    status: Status,
}

async fn set_status(State(server): State<AppState>, Authed(caller): Authed, Path(room): Path<String>, body: axum::body::Bytes) -> Result<Json<JsonValue>> {
    let request: SetStatus = parse_body(&body)?;
    let room_id = room_id(&room)?;
    let (mut session, _) = session_view(&server, &caller, &room_id)?;
    session.status = request.status;
    let content = serde_json::to_value(&session).map_err(Error::internal)?;
    let event_id = super::events::send_event(&server, &caller.user_id, &room_id, PduBuilder::state(SESSION, "", content), None).await?;
    Ok(Json(json!({ "event_id": event_id, "session": session })))
}


/// The fields of a session its therapists may change; a new time is a reschedule.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateSession {
    title: Option<String>,
    starts_at: Option<u64>,
    ends_at: Option<u64>,
    timezone: Option<String>,
    max_participants: Option<u32>,
    join_window_minutes: Option<u32>,
    recording_policy: Option<RecordingPolicy>,
}

/// Reschedules or edits a session: one `org.limbic.session` state event (and the room name
/// with the title), checked by the clinic policy like any other.
async fn update_session(State(server): State<AppState>, Authed(caller): Authed, Path(room): Path<String>, body: axum::body::Bytes) -> Result<Json<JsonValue>> {
    let request: UpdateSession = parse_body(&body)?;
    let room_id = room_id(&room)?;
    let (mut session, _) = session_view(&server, &caller, &room_id)?;
    let renamed = request.title.as_ref().is_some_and(|title| *title != session.title);
    session.title = request.title.unwrap_or(session.title);
    session.starts_at = request.starts_at.unwrap_or(session.starts_at);
    session.ends_at = request.ends_at.unwrap_or(session.ends_at);
    session.timezone = request.timezone.unwrap_or(session.timezone);
    session.max_participants = request.max_participants.unwrap_or(session.max_participants);
    session.join_window_minutes = request.join_window_minutes.unwrap_or(session.join_window_minutes);
    session.recording_policy = request.recording_policy.unwrap_or(session.recording_policy);
    let content = serde_json::to_value(&session).map_err(Error::internal)?;
    let mut writer = server.rooms.writer(&room_id).await?;
    let pdu = writer.append(&caller.user_id, PduBuilder::state(SESSION, "", content), None)?;
    if renamed {
        writer.append(&caller.user_id, PduBuilder::state("m.room.name", "", json!({ "name": session.title })), None)?;
    }
    writer.commit()?;
    Ok(Json(json!({ "event_id": pdu.event_id, "session": session })))
}

// --- the waiting room: Matrix knocks ---

/// Who is knocking, oldest first; for the session's therapists.
async fn waiting_room(State(server): State<AppState>, Authed(caller): Authed, Path(room): Path<String>) -> Result<Json<JsonValue>> {
    let room_id = room_id(&room)?;
    require_session_therapist(&server, &caller, &room_id)?;
    let mut waiting: Vec<JsonValue> = server
        .rooms
        .current_state(&room_id)?
        .into_iter()
        .filter(|pdu| pdu.membership() == Some(Membership::Knock))
        .map(|pdu| {
            let content = pdu.content_json();
            let mut entry = json!({
                "user_id": pdu.state_key,
                "since": pdu.origin_server_ts,
                "displayname": content.get("displayname"),
                "reason": content.get("reason"),
            });
            super::account::strip_nulls(&mut entry);
            entry
        })
        .collect();
    waiting.sort_by_key(|entry| entry["since"].as_u64());
    Ok(Json(json!({ "waiting": waiting })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Decline {
    reason: Option<String>,
}

/// Answers a knock: an invite (admit) or a leave set by the therapist (decline).
async fn answer_knock(server: &AppState, caller: &Caller, room: &str, user: &str, content: JsonValue) -> Result<Json<JsonValue>> {
    let (room_id, user_id) = (room_id(room)?, user_id(user)?);
    require_session_therapist(server, caller, &room_id)?;
    let mut writer = server.rooms.writer(&room_id).await?;
    let knocking = writer.state_event("m.room.member", user_id.as_str())?.is_some_and(|m| m.membership() == Some(Membership::Knock));
    if !knocking {
        return Err(Error::not_found(format!("{user_id} is not in the waiting room")));
    }
    let pdu = writer.append(&caller.user_id, PduBuilder::state("m.room.member", user_id.as_str(), content), None)?;
    writer.commit()?;
    Ok(Json(json!({ "event_id": pdu.event_id })))
}

async fn admit(State(server): State<AppState>, Authed(caller): Authed, Path((room, user)): Path<(String, String)>) -> Result<Json<JsonValue>> {
    answer_knock(&server, &caller, &room, &user, json!({ "membership": "invite" })).await
}

async fn decline(State(server): State<AppState>, Authed(caller): Authed, Path((room, user)): Path<(String, String)>, body: axum::body::Bytes) -> Result<Json<JsonValue>> {
    let request: Decline = if body.is_empty() { Decline::default() } else { parse_body(&body)? };
    let mut content = json!({ "membership": "leave", "reason": request.reason });
    super::account::strip_nulls(&mut content);
    answer_knock(&server, &caller, &room, &user, content).await
}

/// Only server admins see and mark therapists as verified.
async fn get_therapist(State(server): State<AppState>, _admin: Admin, Path(user): Path<String>) -> Result<Json<JsonValue>> {
    let user_id = OwnedUserId::try_from(user).map_err(|_| Error::invalid_param("invalid user id"))?;
    Ok(Json(json!({ "user_id": user_id, "verified": server.clinic.is_verified_therapist(&user_id)? })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetTherapist {
    verified: bool,
}

async fn set_therapist(State(server): State<AppState>, Admin(admin): Admin, Path(user): Path<String>, body: axum::body::Bytes) -> Result<Json<JsonValue>> {
    let request: SetTherapist = parse_body(&body)?;
    let user_id = OwnedUserId::try_from(user).map_err(|_| Error::invalid_param("invalid user id"))?;
    if !server.users.account(&user_id)?.is_some_and(|a| !a.deactivated) {
        return Err(Error::not_found("unknown user"));
    }
    server.clinic.set_verified_therapist(&server.audit, &admin, &user_id, request.verified)?;
    Ok(Json(json!({ "user_id": user_id, "verified": request.verified })))
}

// --- clinical notes ---

/// Notes are for the session's therapists only.
pub(super) fn require_session_therapist(server: &AppState, caller: &Caller, room_id: &ruma::RoomId) -> Result<()> {
    if crate::clinic::session_role(&server.rooms, room_id, caller.user_id.as_str())?.is_some_and(Role::is_therapist) {
        Ok(())
    } else {
        Err(Error::forbidden("only the session's therapists read and write its notes"))
    }
}

/// The session's private notes room, created on first use: never federated, invite-only, for
/// the session's therapists alone (the clinic policy keeps everyone else out).
async fn notes_room(server: &AppState, caller: &Caller, session_room: &ruma::RoomId) -> Result<OwnedRoomId> {
    if let Some(room) = server.clinic.notes_room(session_room)? {
        return Ok(room);
    }
    // The session room's lock makes two first uses create one notes room.
    let _session_lock = server.rooms.writer(session_room).await?;
    if let Some(room) = server.clinic.notes_room(session_room)? {
        return Ok(room);
    }
    let therapist = &caller.user_id;
    let events = vec![
        PduBuilder::state("m.room.create", "", json!({ "room_version": "11", "m.federate": false })),
        PduBuilder::state("m.room.member", therapist.as_str(), json!({ "membership": "join" })),
        PduBuilder::state("m.room.power_levels", "", json!({ "users": { therapist.as_str(): 100 }, "users_default": 50, "invite": 50, "state_default": 50, "events_default": 50 })),
        PduBuilder::state("m.room.join_rules", "", json!({ "join_rule": "invite" })),
        PduBuilder::state("m.room.history_visibility", "", json!({ "history_visibility": "joined" })),
        PduBuilder::state(NOTES_FOR, "", json!({ "room_id": session_room })),
    ];
    let mut writer = server.rooms.new_room(RoomVersionId::V11, therapist, events).await?;
    let room_id = writer.room_id().clone();
    server.clinic.stage_notes_link(writer.batch(), session_room, &room_id);
    writer.commit()?;
    Ok(room_id)
}

/// Every note with its earlier versions, newest version first; the read is audited.
async fn list_notes(State(server): State<AppState>, Authed(caller): Authed, Path(room): Path<String>) -> Result<Json<JsonValue>> {
    let session_room = room_id(&room)?;
    require_session_therapist(&server, &caller, &session_room)?;
    let notes_room = notes_room(&server, &caller, &session_room).await?;
    let mut notes = Vec::new();
    for pdu in server.rooms.current_state(&notes_room)?.into_iter().filter(|p| p.kind.to_string() == NOTE) {
        let mut versions = Vec::new();
        let mut next = Some(pdu.event_id.clone());
        while let Some(event_id) = next {
            let Some(version) = server.rooms.pdu(&event_id)? else { break };
            versions.push(json!({
                "event_id": version.event_id,
                "author": version.sender,
                "ts": version.origin_server_ts,
                "content": version.content_json(),
            }));
            next = server.rooms.meta(&event_id)?.and_then(|m| m.replaces_state);
        }
        notes.push(json!({ "note_id": pdu.state_key, "versions": versions }));
    }
    let record = AuditRecord::new("note_read", &caller.user_id).room(&session_room).details(json!({ "notes": notes.len() }));
    server.audit.write_with(&server.store, server.store.batch(), vec![record])?;
    Ok(Json(json!({ "room_id": notes_room, "notes": notes })))
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
) -> Result<Json<JsonValue>> {
    let request: WriteNote = parse_body(&body)?;
    let session_room = room_id(&room)?;
    require_session_therapist(&server, &caller, &session_room)?;
    if note_id.is_empty() || note_id.starts_with('@') {
        return Err(Error::invalid_param("note ids must not be empty or start with @"));
    }
    let notes_room = notes_room(&server, &caller, &session_room).await?;
    let mut writer = server.rooms.writer(&notes_room).await?;
    let pdu = writer.append(&caller.user_id, PduBuilder::state(NOTE, note_id.as_str(), json!({ "body": request.body })), None)?;
    writer.audit(AuditRecord::new("note_write", &caller.user_id).room(&session_room).details(json!({ "note_id": note_id, "event_id": pdu.event_id })));
    writer.commit()?;
    Ok(Json(json!({ "event_id": pdu.event_id, "room_id": notes_room })))
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

/// The power levels with `user` at `level` (0 removes the entry).
pub(super) fn power_levels_with(writer: &crate::rooms::RoomWriter<'_>, user: &ruma::UserId, level: i64) -> Result<Option<JsonValue>> {
    let mut power = writer.state_event("m.room.power_levels", "")?.map(|p| p.content_json()).unwrap_or_else(|| json!({}));
    let users = power.as_object_mut().map(|p| p.entry("users").or_insert_with(|| json!({})));
    let Some(JsonValue::Object(users)) = users else { return Err(Error::internal("malformed power levels")) };
    let current = users.get(user.as_str()).and_then(JsonValue::as_i64).unwrap_or(0);
    if current == level {
        return Ok(None);
    }
    if level == 0 {
        users.remove(user.as_str());
    } else {
        users.insert(user.to_string(), json!(level));
    }
    Ok(Some(power))
}

/// Adds a participant or changes their role: the role, their power level and an invitation,
/// and, for a therapist demoted, the end of their memberships in the notes room and the
/// breakouts, in one write (the clinic policy checks the limits and who may do it).
async fn set_participant(
    State(server): State<AppState>,
    Authed(caller): Authed,
    Path((room, user)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Result<Json<JsonValue>> {
    let request: SetParticipant = parse_body(&body)?;
    let (room_id, user_id) = (room_id(&room)?, user_id(&user)?);
    if user_id.server_name() == server.server_name() && !server.users.exists(&user_id)? {
        return Err(Error::not_found(format!("unknown user {user_id}")));
    }
    session_view(&server, &caller, &room_id)?;
    let mut writer = server.rooms.writer(&room_id).await?;
    let subrooms = stage_role_change(&server, &room_id, &caller.user_id, &user_id, Some(request.role)).await?;
    writer.append(&caller.user_id, PduBuilder::state(ROLE, role_key(user_id.as_str()), json!({ "role": request.role })), None)?;
    if let Some(power) = power_levels_with(&writer, &user_id, request.role.power_level())? {
        writer.append(&caller.user_id, PduBuilder::state("m.room.power_levels", "", power), None)?;
    }
    let membership = server.rooms.membership(&room_id, &user_id)?;
    if !matches!(membership, Some(Membership::Join | Membership::Invite)) {
        writer.append(&caller.user_id, PduBuilder::state("m.room.member", user_id.as_str(), json!({ "membership": "invite" })), None)?;
    }
    writer.commit_with(subrooms)?;
    Ok(Json(json!({ "user_id": user_id, "role": request.role })))
}

/// Removes a participant: their role and power level go, and they leave the room, its notes
/// room and its breakouts, in one write.
async fn remove_participant(State(server): State<AppState>, Authed(caller): Authed, Path((room, user)): Path<(String, String)>) -> Result<Json<JsonValue>> {
    let (room_id, user_id) = (room_id(&room)?, user_id(&user)?);
    session_view(&server, &caller, &room_id)?;
    let mut writer = server.rooms.writer(&room_id).await?;
    if writer.state_event(ROLE, &role_key(user_id.as_str()))?.is_none() {
        return Err(Error::not_found("not a participant of this session"));
    }
    let subrooms = stage_role_change(&server, &room_id, &caller.user_id, &user_id, None).await?;
    writer.append(&caller.user_id, PduBuilder::state(ROLE, role_key(user_id.as_str()), json!({ "role": null })), None)?;
    if let Some(power) = power_levels_with(&writer, &user_id, 0)? {
        writer.append(&caller.user_id, PduBuilder::state("m.room.power_levels", "", power), None)?;
    }
    if matches!(server.rooms.membership(&room_id, &user_id)?, Some(Membership::Join | Membership::Invite | Membership::Knock)) {
        let leave = json!({ "membership": "leave", "reason": "removed from the session" });
        writer.append(&caller.user_id, PduBuilder::state("m.room.member", user_id.as_str(), leave), None)?;
    }
    writer.commit_with(subrooms)?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
struct RelationshipQuery {
    therapist: OwnedUserId,
    client: OwnedUserId,
}

/// Do therapist T and client C share a session? For T, C and server admins.
async fn relationship(
    State(server): State<AppState>,
    Authed(caller): Authed,
    QueryParams(query): QueryParams<RelationshipQuery>,
) -> Result<Json<JsonValue>> {
    let admin = server.users.account(&caller.user_id)?.is_some_and(|a| a.admin);
    if caller.user_id != query.therapist && caller.user_id != query.client && !admin {
        return Err(Error::forbidden("only the two users or a server admin may ask"));
    }
    let role_in = |room: &ruma::RoomId, user: &ruma::UserId| crate::clinic::session_role(&server.rooms, room, user.as_str());
    let mut sessions = Vec::new();
    for (room, _) in server.rooms.user_rooms(&query.therapist)? {
        if server.rooms.state_event(&room, SESSION, "")?.is_none() {
            continue;
        }
        if role_in(&room, &query.therapist)?.is_some_and(Role::is_therapist) && role_in(&room, &query.client)?.is_some_and(|r| !r.is_therapist()) {
            sessions.push(room);
        }
    }
    Ok(Json(json!({ "shared": !sessions.is_empty(), "sessions": sessions })))
}


// --- transcript export ---

#[derive(Deserialize)]
struct TranscriptQuery {
    #[serde(default)]
    format: Option<String>,
}

/// The session's chat as Markdown (default) or plain text: participants, times, messages and
/// session events, oldest first. Therapists only; audited as `export`.
async fn transcript(
    State(server): State<AppState>,
    Authed(caller): Authed,
    Path(room): Path<String>,
    QueryParams(query): QueryParams<TranscriptQuery>,
) -> Result<axum::response::Response> {
    let room_id = room_id(&room)?;
    require_session_therapist(&server, &caller, &room_id)?;
    let markdown = match query.format.as_deref() {
        None | Some("markdown") => true,
        Some("text") => false,
        Some(other) => return Err(Error::invalid_param(format!("unknown transcript format {other:?}; use markdown or text"))),
    };
    let (session, view) = session_view(&server, &caller, &room_id)?;
    let time = crate::clinic::format_utc;
    let mut out = String::new();
    let heading = if markdown { "# " } else { "" };
    out.push_str(&format!("{heading}{}\n\n", session.title));
    out.push_str(&format!("Session: {:?}, {} to {} ({}), status {:?}\n", session.kind, time(session.starts_at), time(session.ends_at), session.timezone, session.status).to_lowercase());
    out.push_str("Participants:\n");
    for (user, role) in view["roles"].as_object().into_iter().flatten() {
        out.push_str(&format!("{} {user} ({})\n", if markdown { "-" } else { " " }, role.as_str().unwrap_or_default()));
    }
    out.push('\n');
    let upto = server.store.streams().current();
    for entry in server.rooms.timeline_after(&room_id, 0, upto) {
        let (_, event_id) = entry?;
        let Some(pdu) = server.rooms.pdu(&event_id)? else { continue };
        let content = pdu.content_json();
        let line = match pdu.kind.to_string().as_str() {
            "m.room.message" => content.get("body").and_then(JsonValue::as_str).map(|b| format!("{}: {b}", pdu.sender)),
            "m.room.member" => pdu.membership().map(|m| format!("{} — {} ({})", pdu.state_key.clone().unwrap_or_default(), m.as_str(), pdu.sender)),
            kind if kind == SESSION => content.get("status").and_then(JsonValue::as_str).map(|s| format!("session status: {s} ({})", pdu.sender)),
            _ => None,
        };
        if let Some(line) = line {
            let stamp = time(pdu.origin_server_ts.0.into());
            out.push_str(&if markdown { format!("- `{stamp}` {line}\n") } else { format!("[{stamp}] {line}\n") });
        }
    }
    let record = AuditRecord::new("export", &caller.user_id).room(&room_id).details(json!({ "format": if markdown { "markdown" } else { "text" } }));
    server.audit.write_with(&server.store, server.store.batch(), vec![record])?;
    let content_type = if markdown { "text/markdown; charset=utf-8" } else { "text/plain; charset=utf-8" };
    Ok(axum::response::IntoResponse::into_response(([(http::header::CONTENT_TYPE, content_type)], out)))
}
