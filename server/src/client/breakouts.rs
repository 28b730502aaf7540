//! Breakout rooms of a session (`/_limbic/client/v1/sessions/{roomId}/breakouts`): child rooms
//! linked with `m.space.child`/`m.space.parent`, marked by `org.limbic.breakout`. The therapist
//! creates them, moves participants between them and closes them, which returns everyone to the
//! main room. Each operation is one atomic write across the session room and its breakouts; the
//! session room's lock is always taken first, so concurrent operations cannot deadlock.

use axum::{
    Json, Router,
    extract::{Path, State},
    routing::{get, put},
};
use ruma::{OwnedRoomId, OwnedUserId, RoomId, RoomVersionId, UserId};
use serde::Deserialize;
use serde_json::{Value as JsonValue, json};

use super::{
    AppState,
    sessions::{Authed, parse_body, room_id, user_id},
};
use crate::{
    audit::AuditRecord,
    clinic::{
        BREAKOUT, Breakout, CALL_MEMBER, ROLE, Role, SESSION, role_user,
        subrooms::{self, membership_in},
    },
    error::{Error, Result},
    events::PduBuilder,
    rooms::{Membership, RoomWriter},
    users::Caller,
};

pub(super) fn routes(router: Router<AppState>) -> Router<AppState> {
    const BREAKOUTS: &str = "/_limbic/client/v1/sessions/{room_id}/breakouts";
    router
        .route(BREAKOUTS, get(list_breakouts).post(create_breakout))
        .route(&format!("{BREAKOUTS}/{{breakout_id}}"), axum::routing::delete(close_breakout))
        .route(&format!("{BREAKOUTS}/{{breakout_id}}/participants/{{user_id}}"), put(assign).delete(unassign))
}

/// The session's roles, from its room's current state.
fn session_roles(server: &AppState, session_room: &RoomId) -> Result<Vec<(OwnedUserId, Role)>> {
    Ok(server
        .rooms
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
fn present_members(server: &AppState, room: &RoomId) -> Result<Vec<OwnedUserId>> {
    Ok(server
        .rooms
        .current_state(room)?
        .into_iter()
        .filter(|pdu| matches!(pdu.membership(), Some(Membership::Join | Membership::Invite)))
        .filter_map(|pdu| OwnedUserId::try_from(pdu.state_key?).ok())
        .collect())
}

/// Every breakout room ever linked to the session (closed ones too), in state order.
fn breakouts_of(server: &AppState, session_room: &RoomId) -> Result<Vec<(OwnedRoomId, Breakout)>> {
    subrooms::breakouts(&server.rooms, session_room)
}

/// The session's breakout room `breakout_id`, which must still be open.
fn open_breakout(server: &AppState, session_room: &RoomId, breakout_id: &RoomId) -> Result<Breakout> {
    let (_, breakout) = breakouts_of(server, session_room)?
        .into_iter()
        .find(|(room, _)| room == breakout_id)
        .ok_or_else(|| Error::not_found("not a breakout room of this session"))?;
    if breakout.closed {
        return Err(Error::forbidden("the breakout room is closed"));
    }
    Ok(breakout)
}

/// The caller must be in a breakout room to change its memberships.
fn ensure_joined(writer: &mut RoomWriter<'_>, caller: &Caller) -> Result<()> {
    subrooms::ensure_joined(writer, &caller.user_id)
}

/// Stages `user` leaving every open breakout of the session other than `except`, in writers
/// the caller commits.
async fn stage_leave_others<'s>(
    server: &'s AppState,
    caller: &Caller,
    session_room: &RoomId,
    except: Option<&RoomId>,
    user: &UserId,
    writers: &mut Vec<RoomWriter<'s>>,
) -> Result<()> {
    for (room, breakout) in breakouts_of(server, session_room)? {
        if breakout.closed || Some(room.as_ref()) == except || !matches!(server.rooms.membership(&room, user)?, Some(Membership::Join | Membership::Invite)) {
            continue;
        }
        let existing = writers.iter().position(|w| *w.room_id() == room);
        let position = match existing {
            Some(position) => position,
            None => {
                writers.push(server.rooms.writer(&room).await?);
                writers.len() - 1
            }
        };
        let writer = &mut writers[position];
        ensure_joined(writer, caller)?;
        let leave = json!({ "membership": "leave", "reason": "moved to another breakout room" });
        writer.append(&caller.user_id, PduBuilder::state("m.room.member", user.as_str(), leave), None)?;
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBreakout {
    name: String,
    #[serde(default)]
    participants: Vec<OwnedUserId>,
}

/// Creates a breakout room: its state, `m.space.parent` to the session and `m.space.child` in
/// it, invitations for the session's therapists and the given participants (who leave any
/// other breakout), all in one write.
async fn create_breakout(State(server): State<AppState>, Authed(caller): Authed, Path(room): Path<String>, body: axum::body::Bytes) -> Result<Json<JsonValue>> {
    let request: CreateBreakout = parse_body(&body)?;
    let session_room = room_id(&room)?;
    crate::clinic::sessions::require_therapist(&server, &caller.user_id, &session_room, "manage its breakouts")?;
    let session = server.rooms.state_content(&session_room, SESSION, "")?.ok_or_else(|| Error::not_found("not a session"))?;
    let session = crate::clinic::parse_session(&session)?;
    if !session.kind.allows_breakouts() {
        return Err(Error::forbidden(format!("a {:?} session has no breakout rooms", session.kind).to_lowercase()));
    }
    if request.name.trim().is_empty() {
        return Err(Error::bad_json("a breakout room needs a name"));
    }
    let roles = session_roles(&server, &session_room)?;
    if let Some(stranger) = request.participants.iter().find(|p| !roles.iter().any(|(user, _)| user == *p)) {
        return Err(Error::invalid_param(format!("{stranger} is not a participant of the session")));
    }

    let mut main = server.rooms.writer(&session_room).await?;
    let therapists: Vec<&(OwnedUserId, Role)> = roles.iter().filter(|(_, role)| role.is_therapist()).collect();
    let power_users: serde_json::Map<String, JsonValue> = therapists.iter().map(|(user, role)| (user.to_string(), json!(role.power_level()))).collect();
    let staff = Role::CoTherapist.power_level();
    let via = json!([server.server_name()]);
    let events = [
        PduBuilder::state("m.room.create", "", json!({ "room_version": "11" })),
        PduBuilder::state("m.room.member", caller.user_id.as_str(), json!({ "membership": "join" })),
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
    let mut breakout = server.rooms.new_room(RoomVersionId::V11, &caller.user_id, events).await?;
    let breakout_id = breakout.room_id().clone();
    let mut others = Vec::new();
    let invitees = therapists.iter().map(|(user, _)| user).chain(&request.participants).filter(|user| **user != caller.user_id);
    for user in invitees {
        if membership_in(&breakout, user)?.is_none() {
            breakout.append(&caller.user_id, PduBuilder::state("m.room.member", user.as_str(), json!({ "membership": "invite" })), None)?;
        }
    }
    for user in &request.participants {
        stage_leave_others(&server, &caller, &session_room, Some(&breakout_id), user, &mut others).await?;
    }
    main.append(&caller.user_id, PduBuilder::state("m.space.child", breakout_id.as_str(), json!({ "via": via })), None)?;
    main.audit(
        AuditRecord::new("breakout_created", &caller.user_id)
            .room(&session_room)
            .details(json!({ "breakout_room": breakout_id, "name": request.name, "participants": request.participants })),
    );
    others.insert(0, breakout);
    main.commit_with(others)?;
    Ok(Json(json!({ "room_id": breakout_id })))
}

/// The session's breakout rooms with who is in them; for its members and participants.
async fn list_breakouts(State(server): State<AppState>, Authed(caller): Authed, Path(room): Path<String>) -> Result<Json<JsonValue>> {
    let session_room = room_id(&room)?;
    crate::clinic::sessions::view(&server, &caller.user_id, &session_room)?;
    let mut breakouts = Vec::new();
    for (room, breakout) in breakouts_of(&server, &session_room)? {
        let members = if breakout.closed { Vec::new() } else { present_members(&server, &room)? };
        breakouts.push(json!({ "room_id": room, "name": breakout.name, "closed": breakout.closed, "members": members }));
    }
    Ok(Json(json!({ "breakouts": breakouts })))
}

/// Moves a participant into a breakout room (out of any other).
async fn assign(
    State(server): State<AppState>,
    Authed(caller): Authed,
    Path((room, breakout, user)): Path<(String, String, String)>,
) -> Result<Json<JsonValue>> {
    let (session_room, breakout_id, user) = (room_id(&room)?, room_id(&breakout)?, user_id(&user)?);
    crate::clinic::sessions::require_therapist(&server, &caller.user_id, &session_room, "manage its breakouts")?;
    if crate::clinic::session_role(&server.rooms, &session_room, user.as_str())?.is_none() {
        return Err(Error::invalid_param(format!("{user} is not a participant of the session")));
    }
    let main = server.rooms.writer(&session_room).await?;
    open_breakout(&server, &session_room, &breakout_id)?;
    let mut target = server.rooms.writer(&breakout_id).await?;
    ensure_joined(&mut target, &caller)?;
    if !matches!(membership_in(&target, &user)?, Some(Membership::Join | Membership::Invite)) {
        target.append(&caller.user_id, PduBuilder::state("m.room.member", user.as_str(), json!({ "membership": "invite" })), None)?;
    }
    let mut writers = vec![target];
    stage_leave_others(&server, &caller, &session_room, Some(&breakout_id), &user, &mut writers).await?;
    main.commit_with(writers)?;
    Ok(Json(json!({})))
}

/// Stages invitations back into the main room for `users` who are no longer in it.
fn stage_return(main: &mut RoomWriter<'_>, caller: &Caller, users: &[OwnedUserId]) -> Result<()> {
    for user in users {
        if !matches!(membership_in(main, user)?, Some(Membership::Join | Membership::Invite | Membership::Ban)) {
            main.append(&caller.user_id, PduBuilder::state("m.room.member", user.as_str(), json!({ "membership": "invite" })), None)?;
        }
    }
    Ok(())
}

/// Sends a participant back to the main room.
async fn unassign(
    State(server): State<AppState>,
    Authed(caller): Authed,
    Path((room, breakout, user)): Path<(String, String, String)>,
) -> Result<Json<JsonValue>> {
    let (session_room, breakout_id, user) = (room_id(&room)?, room_id(&breakout)?, user_id(&user)?);
    crate::clinic::sessions::require_therapist(&server, &caller.user_id, &session_room, "manage its breakouts")?;
    let mut main = server.rooms.writer(&session_room).await?;
    open_breakout(&server, &session_room, &breakout_id)?;
    let mut target = server.rooms.writer(&breakout_id).await?;
    if !matches!(membership_in(&target, &user)?, Some(Membership::Join | Membership::Invite)) {
        return Err(Error::not_found(format!("{user} is not in this breakout room")));
    }
    ensure_joined(&mut target, &caller)?;
    let leave = json!({ "membership": "leave", "reason": "returned to the main room" });
    target.append(&caller.user_id, PduBuilder::state("m.room.member", user.as_str(), leave), None)?;
    stage_return(&mut main, &caller, &[user])?;
    main.commit_with(vec![target])?;
    Ok(Json(json!({})))
}

/// Closes a breakout room: it is marked closed, everyone leaves it, anyone who had left the
/// main room is invited back, and it is removed from the session's children.
async fn close_breakout(State(server): State<AppState>, Authed(caller): Authed, Path((room, breakout)): Path<(String, String)>) -> Result<Json<JsonValue>> {
    let (session_room, breakout_id) = (room_id(&room)?, room_id(&breakout)?);
    crate::clinic::sessions::require_therapist(&server, &caller.user_id, &session_room, "manage its breakouts")?;
    let mut main = server.rooms.writer(&session_room).await?;
    let mut content = open_breakout(&server, &session_room, &breakout_id)?;
    let mut target = server.rooms.writer(&breakout_id).await?;
    ensure_joined(&mut target, &caller)?;
    let members = present_members(&server, &breakout_id)?;
    content.closed = true;
    target.append(&caller.user_id, PduBuilder::state(BREAKOUT, "", serde_json::to_value(&content).map_err(Error::internal)?), None)?;
    for user in members.iter().filter(|user| **user != caller.user_id) {
        let leave = json!({ "membership": "leave", "reason": "the breakout room is closed" });
        target.append(&caller.user_id, PduBuilder::state("m.room.member", user.as_str(), leave), None)?;
    }
    target.append(&caller.user_id, PduBuilder::state("m.room.member", caller.user_id.as_str(), json!({ "membership": "leave" })), None)?;
    stage_return(&mut main, &caller, &members)?;
    main.append(&caller.user_id, PduBuilder::state("m.space.child", breakout_id.as_str(), json!({})), None)?;
    main.audit(AuditRecord::new("breakout_closed", &caller.user_id).room(&session_room).details(json!({ "breakout_room": breakout_id, "returned": members })));
    main.commit_with(vec![target])?;
    Ok(Json(json!({})))
}
