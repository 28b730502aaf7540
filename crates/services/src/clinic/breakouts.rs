//! Breakout rooms of a session: child rooms linked with `m.space.child`/`m.space.parent`, marked
//! by `org.limbic.breakout`. The therapist creates them, moves participants between them and
//! closes them, which returns everyone to the main room. Each operation is one atomic write
//! across the session room and its breakouts; the session room's lock is always taken first, so
//! concurrent operations cannot deadlock. The HTTP handlers are `client/breakouts.rs`.

use ruma::{OwnedRoomId, OwnedUserId, RoomId, RoomVersionId, UserId};
use serde::{Deserialize, Serialize};
use serde_json::{Value as JsonValue, json};

use super::ClinicHost;
use super::{
    BREAKOUT, Breakout, CALL_MEMBER, ROLE, Role, SESSION, role_user,
    subrooms::{self, membership_in},
};
use crate::{
    audit::AuditRecord,
    error::{Error, Result},
    events::PduBuilder,
    rooms::{Membership, RoomWriter},
};

const WHY: &str = "manage its breakouts";

/// The session's roles, from its room's current state.
fn session_roles(server: &dyn ClinicHost, session_room: &RoomId) -> Result<Vec<(OwnedUserId, Role)>> {
    Ok(server
        .rooms()
        .current_state(session_room)?
        .into_iter()
        .filter(|pdu| pdu.kind.to_string() == ROLE)
        .filter_map(|pdu| {
            let user = OwnedUserId::try_from(role_user(pdu.state_key.as_deref()?)?).ok()?;
            let role = Role::of(&pdu.content_json())?;
            Some((user, role))
        })
        .collect())
}

/// Users joined to or invited into a room.
fn present_members(server: &dyn ClinicHost, room: &RoomId) -> Result<Vec<OwnedUserId>> {
    Ok(server
        .rooms()
        .current_state(room)?
        .into_iter()
        .filter(|pdu| matches!(pdu.membership(), Some(Membership::Join | Membership::Invite)))
        .filter_map(|pdu| OwnedUserId::try_from(pdu.state_key?).ok())
        .collect())
}

/// The session's breakout room `breakout_id`, which must still be open.
fn open_breakout(server: &dyn ClinicHost, session_room: &RoomId, breakout_id: &RoomId) -> Result<Breakout> {
    let (_, breakout) = subrooms::breakouts(server.rooms(), session_room)?
        .into_iter()
        .find(|(room, _)| room == breakout_id)
        .ok_or_else(|| Error::not_found("not a breakout room of this session"))?;
    if breakout.closed {
        return Err(Error::forbidden("the breakout room is closed"));
    }
    Ok(breakout)
}

/// Stages `user` leaving every open breakout of the session other than `except`, in writers
/// the caller commits.
async fn stage_leave_others<'s>(
    server: &'s dyn ClinicHost,
    by: &UserId,
    session_room: &RoomId,
    except: Option<&RoomId>,
    user: &UserId,
    writers: &mut Vec<RoomWriter<'s>>,
) -> Result<()> {
    for (room, breakout) in subrooms::breakouts(server.rooms(), session_room)? {
        if breakout.closed || Some(room.as_ref()) == except || !matches!(server.rooms().membership(&room, user)?, Some(Membership::Join | Membership::Invite)) {
            continue;
        }
        let existing = writers.iter().position(|w| *w.room_id() == room);
        let position = match existing {
            Some(position) => position,
            None => {
                writers.push(server.rooms().writer(&room).await?);
                writers.len() - 1
            }
        };
        let writer = &mut writers[position];
        subrooms::ensure_joined(writer, by)?;
        let leave = json!({ "membership": "leave", "reason": "moved to another breakout room" });
        writer.append(by, PduBuilder::state("m.room.member", user.as_str(), leave), None)?;
    }
    Ok(())
}

/// A breakout room to open (the body of `POST …/breakouts`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewBreakout {
    pub name: String,
    /// Participants of the session to move into it (out of any other breakout).
    #[serde(default)]
    pub participants: Vec<OwnedUserId>,
}

/// A breakout room as the session's members see it.
#[derive(Serialize)]
pub struct BreakoutView {
    pub room_id: OwnedRoomId,
    pub name: String,
    pub closed: bool,
    /// Who is joined or invited (nobody once it is closed).
    pub members: Vec<OwnedUserId>,
}

/// Creates a breakout room: its state, `m.space.parent` to the session and `m.space.child` in
/// it, invitations for the session's therapists and the given participants (who leave any
/// other breakout), all in one write.
pub async fn create(server: &dyn ClinicHost, by: &UserId, session_room: &RoomId, request: NewBreakout) -> Result<OwnedRoomId> {
    super::sessions::require_therapist(server, by, session_room, WHY)?;
    let session = server.rooms().state_content(session_room, SESSION, "")?.ok_or_else(|| Error::not_found("not a session"))?;
    let session = super::parse_session(&session)?;
    if !session.kind.allows_breakouts() {
        return Err(Error::forbidden(format!("a {:?} session has no breakout rooms", session.kind).to_lowercase()));
    }
    if request.name.trim().is_empty() {
        return Err(Error::bad_json("a breakout room needs a name"));
    }
    let roles = session_roles(server, session_room)?;
    if let Some(stranger) = request.participants.iter().find(|p| !roles.iter().any(|(user, _)| user == *p)) {
        return Err(Error::invalid_param(format!("{stranger} is not a participant of the session")));
    }

    let mut main = server.rooms().writer(session_room).await?;
    let therapists: Vec<&(OwnedUserId, Role)> = roles.iter().filter(|(_, role)| role.is_therapist()).collect();
    let power_users: serde_json::Map<String, JsonValue> = therapists.iter().map(|(user, role)| (user.to_string(), json!(role.power_level()))).collect();
    let staff = Role::CoTherapist.power_level();
    let via = json!([server.server_name()]);
    let events = [
        PduBuilder::state("m.room.create", "", json!({ "room_version": "11" })),
        PduBuilder::state("m.room.member", by.as_str(), json!({ "membership": "join" })),
        PduBuilder::state("m.room.power_levels", "", json!({
            "users": power_users, "users_default": 0, "events_default": 0, "state_default": staff,
            "invite": staff, "kick": staff, "ban": staff, "redact": staff, "events": { CALL_MEMBER: 0, "m.room.power_levels": 100 },
        })),
        PduBuilder::state("m.room.join_rules", "", json!({ "join_rule": "invite" })),
        PduBuilder::state("m.room.history_visibility", "", json!({ "history_visibility": "shared" })),
        PduBuilder::state("m.room.guest_access", "", json!({ "guest_access": "forbidden" })),
        PduBuilder::state("m.room.name", "", json!({ "name": format!("{} — {}", session.title, request.name) })),
        PduBuilder::state("m.space.parent", session_room.as_str(), json!({ "via": via, "canonical": true })),
        PduBuilder::state(BREAKOUT, "", json!({ "session_room": session_room, "name": request.name, "closed": false })),
    ];
    let mut breakout = server.rooms().new_room(RoomVersionId::V11, by, events).await?;
    let breakout_id = breakout.room_id().clone();
    let mut others = Vec::new();
    let invitees = therapists.iter().map(|(user, _)| user).chain(&request.participants).filter(|user| **user != *by);
    for user in invitees {
        if membership_in(&breakout, user)?.is_none() {
            breakout.append(by, PduBuilder::state("m.room.member", user.as_str(), json!({ "membership": "invite" })), None)?;
        }
    }
    for user in &request.participants {
        stage_leave_others(server, by, session_room, Some(&breakout_id), user, &mut others).await?;
    }
    main.append(by, PduBuilder::state("m.space.child", breakout_id.as_str(), json!({ "via": via })), None)?;
    main.audit(
        AuditRecord::new("breakout_created", by)
            .room(session_room)
            .details(json!({ "breakout_room": breakout_id, "name": request.name, "participants": request.participants })),
    );
    others.insert(0, breakout);
    main.commit_with(others)?.finish().await;
    Ok(breakout_id)
}

/// The session's breakout rooms with who is in them; for its members and participants.
pub fn list(server: &dyn ClinicHost, user: &UserId, session_room: &RoomId) -> Result<Vec<BreakoutView>> {
    super::sessions::view(server, user, session_room)?;
    let mut breakouts = Vec::new();
    for (room_id, breakout) in subrooms::breakouts(server.rooms(), session_room)? {
        let members = if breakout.closed { Vec::new() } else { present_members(server, &room_id)? };
        breakouts.push(BreakoutView { room_id, name: breakout.name, closed: breakout.closed, members });
    }
    Ok(breakouts)
}

/// Moves a participant into a breakout room (out of any other).
pub async fn assign(server: &dyn ClinicHost, by: &UserId, session_room: &RoomId, breakout_id: &RoomId, user: &UserId) -> Result<()> {
    super::sessions::require_therapist(server, by, session_room, WHY)?;
    if super::session_role(server.rooms(), session_room, user.as_str())?.is_none() {
        return Err(Error::invalid_param(format!("{user} is not a participant of the session")));
    }
    let main = server.rooms().writer(session_room).await?;
    open_breakout(server, session_room, breakout_id)?;
    let mut target = server.rooms().writer(breakout_id).await?;
    subrooms::ensure_joined(&mut target, by)?;
    if !matches!(membership_in(&target, user)?, Some(Membership::Join | Membership::Invite)) {
        target.append(by, PduBuilder::state("m.room.member", user.as_str(), json!({ "membership": "invite" })), None)?;
    }
    let mut writers = vec![target];
    stage_leave_others(server, by, session_room, Some(breakout_id), user, &mut writers).await?;
    main.commit_with(writers)?.finish().await;
    Ok(())
}

/// Stages invitations back into the main room for `users` who are no longer in it.
fn stage_return(main: &mut RoomWriter<'_>, by: &UserId, users: &[OwnedUserId]) -> Result<()> {
    for user in users {
        if !matches!(membership_in(main, user)?, Some(Membership::Join | Membership::Invite | Membership::Ban)) {
            main.append(by, PduBuilder::state("m.room.member", user.as_str(), json!({ "membership": "invite" })), None)?;
        }
    }
    Ok(())
}

/// Sends a participant back to the main room.
pub async fn unassign(server: &dyn ClinicHost, by: &UserId, session_room: &RoomId, breakout_id: &RoomId, user: &UserId) -> Result<()> {
    super::sessions::require_therapist(server, by, session_room, WHY)?;
    let mut main = server.rooms().writer(session_room).await?;
    open_breakout(server, session_room, breakout_id)?;
    let mut target = server.rooms().writer(breakout_id).await?;
    if !matches!(membership_in(&target, user)?, Some(Membership::Join | Membership::Invite)) {
        return Err(Error::not_found(format!("{user} is not in this breakout room")));
    }
    subrooms::ensure_joined(&mut target, by)?;
    let leave = json!({ "membership": "leave", "reason": "returned to the main room" });
    target.append(by, PduBuilder::state("m.room.member", user.as_str(), leave), None)?;
    stage_return(&mut main, by, &[user.to_owned()])?;
    main.commit_with(vec![target])?.finish().await;
    Ok(())
}

/// Closes a breakout room: it is marked closed, everyone leaves it, anyone who had left the
/// main room is invited back, and it is removed from the session's children.
pub async fn close(server: &dyn ClinicHost, by: &UserId, session_room: &RoomId, breakout_id: &RoomId) -> Result<()> {
    super::sessions::require_therapist(server, by, session_room, WHY)?;
    let mut main = server.rooms().writer(session_room).await?;
    let mut content = open_breakout(server, session_room, breakout_id)?;
    let mut target = server.rooms().writer(breakout_id).await?;
    subrooms::ensure_joined(&mut target, by)?;
    let members = present_members(server, breakout_id)?;
    content.closed = true;
    target.append(by, PduBuilder::state(BREAKOUT, "", serde_json::to_value(&content).map_err(Error::internal)?), None)?;
    for user in members.iter().filter(|user| **user != *by) {
        let leave = json!({ "membership": "leave", "reason": "the breakout room is closed" });
        target.append(by, PduBuilder::state("m.room.member", user.as_str(), leave), None)?;
    }
    target.append(by, PduBuilder::state("m.room.member", by.as_str(), json!({ "membership": "leave" })), None)?;
    stage_return(&mut main, by, &members)?;
    main.append(by, PduBuilder::state("m.space.child", breakout_id.as_str(), json!({})), None)?;
    main.audit(AuditRecord::new("breakout_closed", by).room(session_room).details(json!({ "breakout_room": breakout_id, "returned": members })));
    main.commit_with(vec![target])?.finish().await;
    Ok(())
}
