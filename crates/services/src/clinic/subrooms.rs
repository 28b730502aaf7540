//! A session's sub-rooms — its private notes room and its breakout rooms — and what a role
//! change takes away there. Being in a sub-room is a right that comes with a role: whoever loses
//! the role loses the membership in the same atomic write as the role event, so that no /sync,
//! /messages or /state of a sub-room ever reaches someone the session no longer lets in.

use std::sync::Weak;

use ruma::{OwnedRoomId, OwnedUserId, RoomId, UserId};
use serde_json::{Value as JsonValue, json};

use super::ClinicHost;
use super::{BREAKOUT, Breakout, NOTES_FOR, ROLE, Role, SESSION, role_user, session_role};
use crate::{
    error::Result,
    events::{Pdu, PduBuilder},
    rooms::{AfterCommit, FollowUp, Membership, RoomWriter, Rooms},
};

/// Whether `room_id` is a session's private notes room.
pub fn is_notes_room(rooms: &Rooms, room_id: &RoomId) -> Result<bool> {
    Ok(rooms.state_event(room_id, NOTES_FOR, "")?.is_some())
}

/// The session room a notes room belongs to.
pub fn notes_session(rooms: &Rooms, notes_room: &RoomId) -> Result<Option<OwnedRoomId>> {
    Ok(rooms
        .state_content(notes_room, NOTES_FOR, "")?
        .and_then(|content| content.get("room_id")?.as_str().and_then(|room| OwnedRoomId::try_from(room).ok())))
}

/// Every breakout room ever linked to the session (closed ones too), in state order.
pub fn breakouts(rooms: &Rooms, session_room: &RoomId) -> Result<Vec<(OwnedRoomId, Breakout)>> {
    let mut found = Vec::new();
    for pdu in rooms.current_state(session_room)?.into_iter().filter(|p| p.kind == ruma::events::TimelineEventType::SpaceChild) {
        let Some(child) = pdu.state_key.as_deref().and_then(|k| OwnedRoomId::try_from(k).ok()) else { continue };
        let Some(content) = rooms.state_content(&child, BREAKOUT, "")? else { continue };
        let Ok((breakout, of)) = super::parse_breakout(&content) else { continue };
        if of == session_room {
            found.push((child, breakout));
        }
    }
    Ok(found)
}

/// `user`'s membership in the room a writer holds, staged events included.
pub fn membership_in(writer: &RoomWriter<'_>, user: &UserId) -> Result<Option<Membership>> {
    Ok(writer
        .state_event("m.room.member", user.as_str())?
        .and_then(|m| m.membership()))
}

/// Makes `user`, who acts in a sub-room, a joined member of it: therapists are invited into
/// breakouts when they are created, so an invited therapist joins on their first action there.
pub fn ensure_joined(writer: &mut RoomWriter<'_>, user: &UserId) -> Result<()> {
    match membership_in(writer, user)? {
        Some(Membership::Join) => Ok(()),
        Some(Membership::Invite) => writer.append(user, PduBuilder::state("m.room.member", user.as_str(), json!({ "membership": "join" })), None).map(drop),
        _ => Err(crate::error::Error::forbidden("you are not in this breakout room")),
    }
}

/// The role a role event's content gives: `Some(None)` removes the role, `None` is not a
/// valid role (the clinic policy refuses it).
fn role_in_content(content: &JsonValue) -> Option<Option<Role>> {
    match content.get("role") {
        Some(JsonValue::Null) => Some(None),
        Some(role) => serde_json::from_value(role.clone()).ok().map(Some),
        None => None,
    }
}

/// For a role event about to be appended to a session room (by any API): the sub-room
/// writers that end its target's memberships, see [`stage_role_change`]. Nothing for other
/// events.
pub async fn stage_for_event<'s>(server: &'s dyn ClinicHost, room_id: &RoomId, sender: &UserId, builder: &PduBuilder) -> Result<Vec<RoomWriter<'s>>> {
    if builder.kind.to_string() != ROLE {
        return Ok(Vec::new());
    }
    let (Some(user), Some(role)) = (
        builder.state_key.as_deref().and_then(role_user).and_then(|u| <&UserId>::try_from(u).ok()),
        role_in_content(&builder.content),
    ) else {
        return Ok(Vec::new());
    };
    if server.rooms().state_event(room_id, SESSION, "")?.is_none() {
        return Ok(Vec::new());
    }
    stage_role_change(server, room_id, sender, user, role).await
}

/// Stages, in writers of the session's sub-rooms, the end of `user`'s memberships that their
/// new role (`None`: removed from the session) no longer allows: someone who stops being a
/// therapist leaves the notes room and every open breakout (therapists are in all of them), and
/// someone removed from the session leaves every open breakout. The caller holds the session
/// room's writer (so the session room is always locked first), appends the role event to it and
/// commits it with these writers: one atomic write.
///
/// A local user's membership ends with their own leave, which the auth rules always allow
/// whatever the power levels of the sub-room (as deactivation and room deletion do); a user of
/// another server (only ever in a breakout, notes rooms never federate) is kicked by `actor`.
pub async fn stage_role_change<'s>(server: &'s dyn ClinicHost, session_room: &RoomId, actor: &UserId, user: &UserId, role: Option<Role>) -> Result<Vec<RoomWriter<'s>>> {
    let before = session_role(server.rooms(), session_room, user.as_str())?;
    stage_role_loss(server, session_room, actor, user, before, role).await
}

/// [`stage_role_change`] from the role `user` had `before` to `role`.
async fn stage_role_loss<'s>(server: &'s dyn ClinicHost, session_room: &RoomId, actor: &UserId, user: &UserId, before: Option<Role>, role: Option<Role>) -> Result<Vec<RoomWriter<'s>>> {
    let loses_therapist = before.is_some_and(Role::is_therapist) && !role.is_some_and(Role::is_therapist);
    let loses_session = before.is_some() && role.is_none();
    let mut writers = Vec::new();
    if !loses_therapist && !loses_session {
        return Ok(writers);
    }
    let reason = if loses_session { "removed from the session" } else { "no longer a therapist of the session" };
    let mut rooms = Vec::new();
    if loses_therapist && let Some(notes) = server.clinic().notes_room(session_room)? {
        rooms.push(notes);
    }
    rooms.extend(breakouts(server.rooms(), session_room)?.into_iter().filter(|(_, b)| !b.closed).map(|(room, _)| room));
    for room in rooms {
        if !matches!(server.rooms().membership(&room, user)?, Some(Membership::Join | Membership::Invite | Membership::Knock)) {
            continue;
        }
        let mut writer = server.rooms().writer(&room).await?;
        let leave = PduBuilder::state("m.room.member", user.as_str(), json!({ "membership": "leave", "reason": reason }));
        if user.server_name() == server.server_name() {
            writer.append(user, leave, None)?;
        } else {
            ensure_joined(&mut writer, actor)?;
            writer.append(actor, leave, None)?;
        }
        writers.push(writer);
    }
    Ok(writers)
}

/// A role change another server sent: its sender's server staged what it could (it cannot reach
/// this server's notes rooms, which never federate), so this server ends its own users'
/// sub-room memberships the new role no longer allows, right after the role event is committed
/// (a local role change does it in the same write, through [`stage_for_event`]).
pub struct RemoteRoleChanges {
    server: Weak<dyn ClinicHost>,
    server_name: ruma::OwnedServerName,
}

impl RemoteRoleChanges {
    pub fn new(server: Weak<dyn ClinicHost>, server_name: ruma::OwnedServerName) -> Self {
        Self { server, server_name }
    }
}

impl AfterCommit for RemoteRoleChanges {
    fn committed(&self, events: &[Pdu]) -> Option<FollowUp> {
        let changes: Vec<(Pdu, OwnedUserId)> = events
            .iter()
            .filter(|pdu| pdu.kind.to_string() == ROLE && pdu.sender.server_name() != self.server_name)
            .filter_map(|pdu| {
                let user = OwnedUserId::try_from(pdu.state_key.as_deref().and_then(role_user)?).ok()?;
                (user.server_name() == self.server_name).then(|| (pdu.clone(), user))
            })
            .collect();
        if changes.is_empty() {
            return None;
        }
        let server = self.server.clone();
        Some(Box::pin(async move {
            let Some(server) = server.upgrade() else { return };
            for (pdu, user) in changes {
                if let Err(error) = end_remotely_lost_memberships(&server, &pdu, &user).await {
                    tracing::error!(room_id = %pdu.room_id, %user, %error, "could not end sub-room memberships after a role change from another server");
                }
            }
        }))
    }
}

async fn end_remotely_lost_memberships(server: &dyn ClinicHost, pdu: &Pdu, user: &UserId) -> Result<()> {
    let Some(role) = role_in_content(&pdu.content_json()) else { return Ok(()) };
    let replaced = server.rooms().meta(&pdu.event_id)?.and_then(|meta| meta.replaces_state);
    let before = match replaced {
        Some(event_id) => server.rooms().pdu(&event_id)?.and_then(|previous| Role::of(&previous.content_json())),
        None => None,
    };
    // The user leaves by themselves (always allowed), so the sender need not act here; every
    // sub-room in one write.
    let mut writers = stage_role_loss(server, &pdu.room_id, user, user, before, role).await?;
    if let Some(first) = writers.pop() {
        first.commit_with(writers)?.finish().await;
    }
    Ok(())
}
