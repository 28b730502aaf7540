//! Therapy sessions as a domain service: created, edited, ended and peopled here, each change
//! one write of ordinary state events that the clinic policy checks like any other. The HTTP
//! handlers (`client/sessions.rs`, `client/appointments.rs`) parse, call and map errors.

use std::collections::BTreeMap;

use ruma::{OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, RoomVersionId, UserId};
use serde::{Deserialize, Serialize};
use serde_json::{Value as JsonValue, json};

use super::ClinicHost;
use super::{CALL_MEMBER, HAND, Kind, RECORDING, RECORDING_CONSENT, ROLE, RecordingPolicy, Role, SESSION, Session, Status, role_key, role_user, subrooms::stage_role_change};
use crate::{
    error::{Error, Result},
    events::PduBuilder,
    rooms::{Committed, Membership, RoomWriter},
};

/// Someone to invite into a new session, with their role.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Participant {
    pub user_id: OwnedUserId,
    pub role: Role,
}

/// A session to schedule (the body of `POST /sessions`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewSession {
    pub kind: Kind,
    pub title: String,
    pub starts_at: u64,
    pub ends_at: u64,
    pub timezone: String,
    #[serde(default)]
    pub participants: Vec<Participant>,
    #[serde(default)]
    pub recording_policy: RecordingPolicy,
    pub max_participants: Option<u32>,
    pub join_window_minutes: Option<u32>,
    /// Knocks and joins then need it; only its argon2 hash is kept.
    #[serde(default)]
    pub passcode: Option<String>,
}

/// The fields of a session its therapists may change (`PATCH`); a new time is a reschedule.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionChanges {
    title: Option<String>,
    starts_at: Option<u64>,
    ends_at: Option<u64>,
    timezone: Option<String>,
    max_participants: Option<u32>,
    join_window_minutes: Option<u32>,
    recording_policy: Option<RecordingPolicy>,
}

/// A session as its members see it.
#[derive(Serialize)]
pub struct SessionView {
    pub room_id: OwnedRoomId,
    pub session: Session,
    /// Each participant's role, by user id.
    pub roles: BTreeMap<String, Role>,
    pub join_window: JoinWindow,
}

#[derive(Serialize)]
pub struct JoinWindow {
    pub opens_at: u64,
    pub closes_at: u64,
    pub open: bool,
}

/// Someone knocking at a session (its waiting room).
#[derive(Serialize)]
pub struct Waiting {
    pub user_id: Option<String>,
    pub since: ruma::MilliSecondsSinceUnixEpoch,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub displayname: Option<JsonValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<JsonValue>,
}

fn now() -> u64 {
    ruma::MilliSecondsSinceUnixEpoch::now().0.into()
}

fn power_levels(therapist: &UserId, participants: &[Participant]) -> JsonValue {
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

/// Stages a new session room with `therapist` as its therapist: its state, the roles and the
/// invitations, in a writer the caller commits (with records of its own, if any).
pub async fn stage<'s>(server: &'s dyn ClinicHost, therapist: &UserId, request: NewSession) -> Result<(RoomWriter<'s>, Session)> {
    if request.participants.iter().any(|p| p.user_id == therapist) {
        return Err(Error::bad_json("the creating therapist is a participant already"));
    }
    for p in &request.participants {
        if p.user_id.server_name() == server.server_name() && !server.users().exists(&p.user_id)? {
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
        max_participants: request.max_participants.unwrap_or_else(|| server.clinic().kind_limit(request.kind)),
        join_window_minutes: request.join_window_minutes.unwrap_or(15),
        recording_policy: request.recording_policy,
    };
    let account = server.users().account(therapist)?.ok_or_else(|| Error::forbidden("unknown user"))?;
    let mut member = json!({ "membership": "join" });
    if let Some(name) = account.displayname {
        member["displayname"] = json!(name);
    }

    let mut events = vec![
        PduBuilder::state("m.room.create", "", json!({ "room_version": "11" })),
        PduBuilder::state("m.room.member", therapist.as_str(), member),
        PduBuilder::state("m.room.power_levels", "", power_levels(therapist, &request.participants)),
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

    let mut writer = server.rooms().new_room(RoomVersionId::V11, therapist, events).await?;
    let room_id = writer.room_id().clone();
    if let Some(passcode) = request.passcode.as_deref().filter(|p| !p.is_empty()) {
        server.clinic().stage_passcode(writer.batch(), &room_id, passcode)?;
    }
    Ok((writer, session))
}

/// Creates a session room in one atomic write: its state, the roles and the invitations.
pub async fn create(server: &dyn ClinicHost, therapist: &UserId, request: NewSession) -> Result<(OwnedRoomId, Session)> {
    let (writer, session) = stage(server, therapist, request).await?;
    let room_id = writer.room_id().clone();
    writer.commit()?.finish().await;
    Ok((room_id, session))
}

/// The session's content and roles; for its members and participants only (those who left or
/// were declined see nothing, not even that it exists).
pub fn view(server: &dyn ClinicHost, user: &UserId, room_id: &RoomId) -> Result<SessionView> {
    let content = server.rooms().state_content(room_id, SESSION, "")?.ok_or_else(|| Error::not_found("not a session"))?;
    let role = super::session_role(server.rooms(), room_id, user.as_str())?;
    let member = matches!(server.rooms().membership(room_id, user)?, Some(Membership::Join | Membership::Invite | Membership::Knock));
    if role.is_none() && !member {
        return Err(Error::not_found("not a session"));
    }
    let session = crate::clinic::parse_session(&content)?;
    let roles = server
        .rooms()
        .current_state(room_id)?
        .into_iter()
        .filter(|pdu| pdu.kind.to_string() == ROLE)
        .filter_map(|pdu| Some((role_user(pdu.state_key.as_deref()?)?.to_owned(), Role::of(&pdu.content_json())?)))
        .collect();
    let join_window = JoinWindow { opens_at: session.join_opens_at(), closes_at: session.ends_at, open: session.join_window_open(now()) };
    Ok(SessionView { room_id: room_id.to_owned(), session, roles, join_window })
}

/// The user's sessions that have not ended and are still live, soonest first.
pub fn upcoming(server: &dyn ClinicHost, user: &UserId) -> Result<Vec<SessionView>> {
    let now = now();
    let mut sessions = Vec::new();
    for (room_id, _) in server.rooms().user_rooms(user)? {
        let Ok(view) = view(server, user, &room_id) else { continue };
        if view.session.status.is_live() && view.session.ends_at > now {
            sessions.push(view);
        }
    }
    sessions.sort_by_key(|view| view.session.starts_at);
    Ok(sessions)
}

/// The longest range [`in_range`] answers: a year and a bit, so that a calendar's year view fits
/// and no request makes the server read every session there is.
pub const MAX_RANGE_MS: u64 = 400 * 24 * 60 * 60 * 1000;

/// The user's sessions, of any status, past ones included, that overlap `[from, to)` (ms since
/// the Unix epoch), earliest first. Sessions the user has left or was declined from are not
/// theirs any more and are not listed.
pub fn in_range(server: &dyn ClinicHost, user: &UserId, from: u64, to: u64) -> Result<Vec<SessionView>> {
    if to <= from {
        return Err(Error::invalid_param("`to` must be after `from`"));
    }
    if to - from > MAX_RANGE_MS {
        return Err(Error::invalid_param("the range may span at most 400 days"));
    }
    let mut sessions = Vec::new();
    for (room_id, _) in server.rooms().user_rooms(user)? {
        let Ok(view) = view(server, user, &room_id) else { continue };
        if view.session.starts_at < to && view.session.ends_at > from {
            sessions.push(view);
        }
    }
    sessions.sort_by_key(|view| view.session.starts_at);
    Ok(sessions)
}

/// Moves the session along its status workflow (the clinic policy refuses other moves). Ending
/// it stops its recording and its calls before this returns (an after-commit hook).
pub async fn set_status(server: &dyn ClinicHost, by: &UserId, room_id: &RoomId, status: Status) -> Result<(OwnedEventId, Session)> {
    let mut session = view(server, by, room_id)?.session;
    session.status = status;
    let content = serde_json::to_value(&session).map_err(Error::internal)?;
    let pdu = server.send_local_event(by, room_id, PduBuilder::state(SESSION, "", content)).await?;
    Ok((pdu.event_id, session))
}

/// Reschedules or edits a session: one `org.limbic.session` state event (and the room name
/// with the title).
pub async fn update(server: &dyn ClinicHost, by: &UserId, room_id: &RoomId, changes: SessionChanges) -> Result<(OwnedEventId, Session)> {
    let mut session = view(server, by, room_id)?.session;
    let renamed = changes.title.as_ref().is_some_and(|title| *title != session.title);
    session.title = changes.title.unwrap_or(session.title);
    session.starts_at = changes.starts_at.unwrap_or(session.starts_at);
    session.ends_at = changes.ends_at.unwrap_or(session.ends_at);
    session.timezone = changes.timezone.unwrap_or(session.timezone);
    session.max_participants = changes.max_participants.unwrap_or(session.max_participants);
    session.join_window_minutes = changes.join_window_minutes.unwrap_or(session.join_window_minutes);
    session.recording_policy = changes.recording_policy.unwrap_or(session.recording_policy);
    let content = serde_json::to_value(&session).map_err(Error::internal)?;
    let mut writer = server.rooms().writer(room_id).await?;
    let pdu = writer.append(by, PduBuilder::state(SESSION, "", content), None)?;
    if renamed {
        writer.append(by, PduBuilder::state("m.room.name", "", json!({ "name": session.title })), None)?;
    }
    writer.commit()?.finish().await;
    Ok((pdu.event_id, session))
}

/// Refuses anyone but the session's therapists.
pub fn require_therapist(server: &dyn ClinicHost, user: &UserId, room_id: &RoomId, why: &str) -> Result<()> {
    if super::session_role(server.rooms(), room_id, user.as_str())?.is_some_and(Role::is_therapist) {
        Ok(())
    } else {
        Err(Error::forbidden(format!("only the session's therapists {why}")))
    }
}

/// Who is knocking, oldest first; for the session's therapists.
pub fn waiting(server: &dyn ClinicHost, by: &UserId, room_id: &RoomId) -> Result<Vec<Waiting>> {
    require_therapist(server, by, room_id, "see its waiting room")?;
    let mut waiting: Vec<Waiting> = server
        .rooms()
        .current_state(room_id)?
        .into_iter()
        .filter(|pdu| pdu.membership() == Some(Membership::Knock))
        .map(|pdu| {
            let content = pdu.content_json();
            let field = |name: &str| content.get(name).filter(|value| !value.is_null()).cloned();
            Waiting { user_id: pdu.state_key.clone(), since: pdu.origin_server_ts, displayname: field("displayname"), reason: field("reason") }
        })
        .collect();
    waiting.sort_by_key(|entry| entry.since);
    Ok(waiting)
}

/// How a therapist answers a knock.
pub enum Answer {
    Admit,
    Decline { reason: Option<String> },
}

/// Answers a knock: an invite (admit) or a leave set by the therapist (decline).
pub async fn answer_knock(server: &dyn ClinicHost, by: &UserId, room_id: &RoomId, user: &UserId, answer: Answer) -> Result<OwnedEventId> {
    require_therapist(server, by, room_id, "admit and decline")?;
    let admit = matches!(answer, Answer::Admit);
    let content = match answer {
        Answer::Admit => json!({ "membership": "invite" }),
        Answer::Decline { reason: Some(reason) } => json!({ "membership": "leave", "reason": reason }),
        Answer::Decline { reason: None } => json!({ "membership": "leave" }),
    };
    let mut writer = server.rooms().writer(room_id).await?;
    let knocking = writer.state_event("m.room.member", user.as_str())?.is_some_and(|m| m.membership() == Some(Membership::Knock));
    if !knocking {
        return Err(Error::not_found(format!("{user} is not in the waiting room")));
    }
    // Someone let in who could not then join (the clinic policy counts joins against the
    // limit) would only wait again: a full session admits nobody.
    if admit {
        let session = writer.state_event(SESSION, "")?.ok_or_else(|| Error::not_found("not a session"))?;
        let limit = crate::clinic::parse_session(&session.content_json())?.max_participants;
        if server.rooms().joined_members(room_id)?.len() as u32 >= limit {
            return Err(Error::forbidden(format!("the session is full ({limit} participants)")));
        }
    }
    let pdu = writer.append(by, PduBuilder::state("m.room.member", user.as_str(), content), None)?;
    writer.commit()?.finish().await;
    Ok(pdu.event_id)
}

/// The power levels with `user` at `level` (0 removes the entry); `None` when they are there.
fn power_levels_with(writer: &RoomWriter<'_>, user: &UserId, level: i64) -> Result<Option<JsonValue>> {
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
pub async fn set_participant(server: &dyn ClinicHost, by: &UserId, room_id: &RoomId, user: &UserId, role: Role) -> Result<()> {
    if user.server_name() == server.server_name() && !server.users().exists(user)? {
        return Err(Error::not_found(format!("unknown user {user}")));
    }
    view(server, by, room_id)?;
    let mut writer = server.rooms().writer(room_id).await?;
    let subrooms = stage_role_change(server, room_id, by, user, Some(role)).await?;
    writer.append(by, PduBuilder::state(ROLE, role_key(user.as_str()), json!({ "role": role })), None)?;
    if let Some(power) = power_levels_with(&writer, user, role.power_level())? {
        writer.append(by, PduBuilder::state("m.room.power_levels", "", power), None)?;
    }
    if !matches!(server.rooms().membership(room_id, user)?, Some(Membership::Join | Membership::Invite)) {
        writer.append(by, PduBuilder::state("m.room.member", user.as_str(), json!({ "membership": "invite" })), None)?;
    }
    finish(writer.commit_with(subrooms)?).await
}

/// Removes a participant: their role and power level go, and they leave the room, its notes
/// room and its breakouts, in one write.
pub async fn remove_participant(server: &dyn ClinicHost, by: &UserId, room_id: &RoomId, user: &UserId) -> Result<()> {
    view(server, by, room_id)?;
    let mut writer = server.rooms().writer(room_id).await?;
    if writer.state_event(ROLE, &role_key(user.as_str()))?.is_none() {
        return Err(Error::not_found("not a participant of this session"));
    }
    let subrooms = stage_role_change(server, room_id, by, user, None).await?;
    writer.append(by, PduBuilder::state(ROLE, role_key(user.as_str()), json!({ "role": null })), None)?;
    if let Some(power) = power_levels_with(&writer, user, 0)? {
        writer.append(by, PduBuilder::state("m.room.power_levels", "", power), None)?;
    }
    if matches!(server.rooms().membership(room_id, user)?, Some(Membership::Join | Membership::Invite | Membership::Knock)) {
        let leave = json!({ "membership": "leave", "reason": "removed from the session" });
        writer.append(by, PduBuilder::state("m.room.member", user.as_str(), leave), None)?;
    }
    finish(writer.commit_with(subrooms)?).await
}

async fn finish(committed: Committed) -> Result<()> {
    committed.finish().await;
    Ok(())
}

/// The sessions therapist and client share (the therapist a therapist in each, the client not).
pub fn shared(server: &dyn ClinicHost, therapist: &UserId, client: &UserId) -> Result<Vec<OwnedRoomId>> {
    let role_in = |room: &RoomId, user: &UserId| super::session_role(server.rooms(), room, user.as_str());
    let mut sessions = Vec::new();
    for (room, _) in server.rooms().user_rooms(therapist)? {
        if server.rooms().state_event(&room, SESSION, "")?.is_none() {
            continue;
        }
        if role_in(&room, therapist)?.is_some_and(Role::is_therapist) && role_in(&room, client)?.is_some_and(|r| !r.is_therapist()) {
            sessions.push(room);
        }
    }
    Ok(sessions)
}
