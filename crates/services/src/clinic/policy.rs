//! The clinic policy, applied at the authorize step after the room version's auth rules: session
//! state only from therapists and only along the status workflow, no double-booking, roles
//! within the participant limit, joins only for scheduled participants inside the join window.

use ruma::{OwnedUserId, RoomId, UserId, events::TimelineEventType};
use serde_json::Value as JsonValue;

use super::{BREAKOUT, Breakout, CALL_MEMBER, Clinic, RTC_MEMBER, HAND, NOTE, NOTES_FOR, RECORDING_CONSENT, ROLE, Role, SESSION, Session, role_key, role_user};
use crate::{
    error::{Error, Result},
    events::Pdu,
    rooms::{Membership, RoomView},
};

/// What the policy may read: the room's state, and other rooms' current state for
/// double-booking checks.
pub struct PolicyContext<'a> {
    pub clinic: &'a Clinic,
    pub rooms: &'a crate::rooms::Rooms,
    pub room_id: &'a RoomId,
    pub room: &'a dyn RoomView,
    pub now: u64,
}

impl PolicyContext<'_> {
    fn session(&self) -> Result<Option<(Session, Pdu)>> {
        match self.room.state(SESSION, "")? {
            Some(pdu) => Ok(Some((crate::clinic::parse_session(&pdu.content_json())?, pdu))),
            None => Ok(None),
        }
    }

    fn role(&self, user: &str) -> Result<Option<Role>> {
        Ok(self.room.state(ROLE, &role_key(user))?.and_then(|pdu| Role::of(&pdu.content_json())))
    }

    /// Users with a role, and their roles.
    fn roles(&self) -> Result<Vec<(String, Role)>> {
        Ok(self.room.state_of_type(ROLE)?
            .into_iter()
            .filter_map(|(key, pdu)| Some((role_user(&key)?.to_owned(), Role::of(&pdu.content_json())?)))
            .collect())
    }

    fn therapists(&self) -> Result<Vec<OwnedUserId>> {
        Ok(self
            .roles()?
            .into_iter()
            .filter(|(_, role)| role.is_therapist())
            .filter_map(|(user, _)| OwnedUserId::try_from(user).ok())
            .collect())
    }
}

fn refuse(message: impl Into<String>) -> Error {
    Error::forbidden(message)
}

/// A join before the window: the message and `org.limbic.opens_at` (ms) say when it opens.
fn not_open_yet(opens_at: u64) -> Error {
    Error::Detailed {
        status: http::StatusCode::FORBIDDEN,
        body: serde_json::json!({
            "errcode": "M_FORBIDDEN",
            "error": format!("the session opens for joining at {}", super::format_utc(opens_at)),
            "org.limbic.opens_at": opens_at,
        }),
    }
}

/// Applies the clinic rules to `pdu`. Rooms that are not sessions are not affected.
pub fn authorize(ctx: &PolicyContext<'_>, pdu: &Pdu) -> Result<()> {
    let kind = pdu.kind.to_string();
    if kind == CALL_MEMBER || kind == RTC_MEMBER {
        check_call_member(ctx, pdu)?;
    }
    if kind == SESSION {
        return check_session(ctx, pdu);
    }
    if kind == BREAKOUT {
        return check_breakout_state(ctx, pdu);
    }
    if let Some(notes_for) = ctx.room.state(NOTES_FOR, "")? {
        return check_notes_room(ctx, pdu, &notes_for);
    }
    if kind == NOTES_FOR {
        return check_notes_link(ctx, pdu);
    }
    if let Some(breakout) = ctx.room.state(BREAKOUT, "")? {
        let (breakout, session_room) = super::parse_breakout(&breakout.content_json())?;
        return check_breakout_room(ctx, pdu, &breakout, &session_room);
    }
    if kind == NOTE {
        return Err(refuse("notes live only in a session's private notes room"));
    }
    let Some((session, session_pdu)) = ctx.session()? else {
        if kind == ROLE {
            return Err(refuse("roles belong to session rooms"));
        }
        return Ok(());
    };
    match pdu.kind {
        TimelineEventType::RoomMember => check_membership(ctx, pdu, &session),
        _ if kind == ROLE => check_role(ctx, pdu, &session, &session_pdu),
        _ if kind == RECORDING_CONSENT => check_own_flag(ctx, pdu, "consent"),
        _ if kind == HAND => check_own_flag(ctx, pdu, "raised"),
        _ if kind.starts_with("org.limbic.") && pdu.is_state() => {
            // Recording policy and other clinic state: therapists only.
            if ctx.role(pdu.sender.as_str())?.is_some_and(Role::is_therapist) {
                Ok(())
            } else {
                Err(refuse(format!("only the session's therapists may set {kind}")))
            }
        }
        _ => Ok(()),
    }
}

/// In a session's rooms (the session room, its breakouts and notes room), MatrixRTC call
/// membership is owned state (MSC3779, MSC4143): its state key is the sender's user id, or
/// starts with `{user id}_` or `_{user id}_`, so nobody puts someone else in a call or takes
/// them out of it. (A server name has no `_`, so the prefix cannot name another user.)
fn check_call_member(ctx: &PolicyContext<'_>, pdu: &Pdu) -> Result<()> {
    let Some(state_key) = pdu.state_key.as_deref() else { return Ok(()) };
    let clinic_room = ctx.room.state(SESSION, "")?.is_some() || ctx.room.state(BREAKOUT, "")?.is_some() || ctx.room.state(NOTES_FOR, "")?.is_some();
    if !clinic_room {
        return Ok(());
    }
    let owner = pdu.sender.as_str();
    let owned = state_key == owner
        || state_key.strip_prefix(owner).is_some_and(|rest| rest.starts_with('_'))
        || state_key.strip_prefix('_').and_then(|key| key.strip_prefix(owner)).is_some_and(|rest| rest.starts_with('_'));
    if owned {
        Ok(())
    } else {
        Err(refuse(format!("{} state keys are the sender's own: {owner}, {owner}_… or _{owner}_…", pdu.kind)))
    }
}

/// A participant's own flag (recording consent, raised hand): set by the participant it is
/// keyed by, who has a role in the session, as `{<field>: bool}`.
fn check_own_flag(ctx: &PolicyContext<'_>, pdu: &Pdu, field: &str) -> Result<()> {
    let kind = pdu.kind.to_string();
    if pdu.state_key.as_deref() != Some(pdu.sender.as_str()) {
        return Err(refuse(format!("{kind} is set by the participant it is keyed by")));
    }
    if ctx.role(pdu.sender.as_str())?.is_none() {
        return Err(refuse(format!("only the session's participants set {kind}")));
    }
    let content = pdu.content_json();
    if !content.get(field).is_some_and(serde_json::Value::is_boolean) || content.as_object().is_some_and(|o| o.len() != 1) {
        return Err(Error::bad_json(format!("{kind} content is {{\"{field}\": true|false}}")));
    }
    Ok(())
}

/// The role `user` holds in another room's session.
fn role_in(ctx: &PolicyContext<'_>, session_room: &RoomId, user: &str) -> Result<Option<Role>> {
    super::session_role(ctx.rooms, session_room, user)
}

/// `org.limbic.breakout` marks a breakout room of a live session that allows them; only that
/// session's therapists set it, its session never changes and a closed breakout stays closed.
fn check_breakout_state(ctx: &PolicyContext<'_>, pdu: &Pdu) -> Result<()> {
    if pdu.state_key.as_deref() != Some("") {
        return Err(Error::bad_json(format!("{BREAKOUT} takes the empty state key")));
    }
    let (new, session_room) = super::parse_breakout(&pdu.content_json())?;
    new.check().map_err(Error::bad_json)?;
    if let Some(old) = ctx.room.state(BREAKOUT, "")? {
        let (old, _) = super::parse_breakout(&old.content_json())?;
        if old.session_room != new.session_room {
            return Err(refuse("a breakout room's session cannot change"));
        }
        if old.closed && !new.closed {
            return Err(refuse("a closed breakout room stays closed"));
        }
    }
    if !role_in(ctx, &session_room, pdu.sender.as_str())?.is_some_and(Role::is_therapist) {
        return Err(refuse("only the session's therapists manage its breakout rooms"));
    }
    let session = ctx.rooms.state_content(&session_room, SESSION, "")?.ok_or_else(|| Error::bad_json("session_room is not a session"))?;
    let session = crate::clinic::parse_session(&session)?;
    if !session.kind.allows_breakouts() {
        return Err(refuse(format!("a {:?} session has no breakout rooms", session.kind).to_lowercase()));
    }
    if !new.closed && !session.status.is_live() {
        return Err(refuse(format!("the session is {:?}", session.status).to_lowercase()));
    }
    Ok(())
}

/// A breakout room is for its session's participants while it is open; its state is the
/// session's therapists' to set.
fn check_breakout_room(ctx: &PolicyContext<'_>, pdu: &Pdu, breakout: &Breakout, session_room: &RoomId) -> Result<()> {
    let membership = Membership::of(&pdu.content_json());
    match (pdu.kind.clone(), membership) {
        (TimelineEventType::RoomMember, Some(Membership::Join | Membership::Invite | Membership::Knock)) => {
            if breakout.closed {
                return Err(refuse("the breakout room is closed"));
            }
            let target = pdu.state_key.as_deref().unwrap_or_default();
            if role_in(ctx, session_room, target)?.is_none() {
                return Err(refuse("only the session's participants enter its breakout rooms"));
            }
            Ok(())
        }
        // Someone else's leave or ban is a therapist's to give (a demoted therapist's power
        // level may outlive their role in a breakout's power levels).
        (TimelineEventType::RoomMember, _)
            if pdu.state_key.as_deref() != Some(pdu.sender.as_str()) && !role_in(ctx, session_room, pdu.sender.as_str())?.is_some_and(Role::is_therapist) =>
        {
            Err(refuse("only the session's therapists remove people from its breakout rooms"))
        }
        (TimelineEventType::RoomMember, _) => Ok(()),
        (kind, _) if kind.to_string() == ROLE || kind.to_string() == NOTE => Err(refuse(format!("{kind} does not belong in a breakout room"))),
        _ if pdu.is_state() && !role_in(ctx, session_room, pdu.sender.as_str())?.is_some_and(Role::is_therapist) => {
            Err(refuse("only the session's therapists change a breakout room"))
        }
        _ => Ok(()),
    }
}

/// Only a session's therapists make a room its notes room, and only a room that never
/// federates.
fn check_notes_link(ctx: &PolicyContext<'_>, pdu: &Pdu) -> Result<()> {
    let session_room = pdu
        .content_json()
        .get("room_id")
        .and_then(JsonValue::as_str)
        .and_then(|r| ruma::OwnedRoomId::try_from(r).ok())
        .ok_or_else(|| Error::bad_json(format!("{NOTES_FOR} needs the session's `room_id`")))?;
    if pdu.state_key.as_deref() != Some("") {
        return Err(Error::bad_json(format!("{NOTES_FOR} takes the empty state key")));
    }
    if ctx.rooms.state_content(&session_room, SESSION, "")?.is_none() {
        return Err(Error::bad_json(format!("{session_room} is not a session")));
    }
    if !role_in(ctx, &session_room, pdu.sender.as_str())?.is_some_and(Role::is_therapist) {
        return Err(refuse("only the session's therapists make its notes room"));
    }
    let federates = ctx.room.state("m.room.create", "")?.is_none_or(|create| create.content_json().get("m.federate") != Some(&JsonValue::Bool(false)));
    if federates {
        return Err(refuse("a notes room must not federate (m.federate: false)"));
    }
    Ok(())
}

/// A notes room is for the session's therapists alone: nobody else is invited or joins, and
/// only therapists write there.
fn check_notes_room(ctx: &PolicyContext<'_>, pdu: &Pdu, notes_for: &Pdu) -> Result<()> {
    let session_room = notes_for
        .content_json()
        .get("room_id")
        .and_then(JsonValue::as_str)
        .and_then(|r| ruma::OwnedRoomId::try_from(r).ok())
        .ok_or_else(|| Error::internal("notes room without its session"))?;
    let is_therapist = |user: &str| -> Result<bool> {
        Ok(ctx
            .rooms
            .state_content(&session_room, ROLE, &role_key(user))?
            .and_then(|c| Role::of(&c))
            .is_some_and(Role::is_therapist))
    };
    let membership = Membership::of(&pdu.content_json());
    match (pdu.kind.clone(), membership) {
        (TimelineEventType::RoomMember, Some(Membership::Join | Membership::Invite | Membership::Knock)) => {
            let target = pdu.state_key.as_deref().unwrap_or_default();
            if is_therapist(target)? { Ok(()) } else { Err(refuse("only the session's therapists may enter its notes room")) }
        }
        (TimelineEventType::RoomMember, _) => Ok(()),
        _ if pdu.kind.to_string() == NOTES_FOR => Err(refuse("a notes room's session cannot change")),
        _ if pdu.kind.to_string() == NOTE && pdu.content_json().get("body").is_none_or(|body| !body.is_string()) => {
            Err(Error::bad_json("a note is {\"body\": \"...\"}"))
        }
        _ => {
            if is_therapist(pdu.sender.as_str())? { Ok(()) } else { Err(refuse("only the session's therapists write notes")) }
        }
    }
}

fn check_session(ctx: &PolicyContext<'_>, pdu: &Pdu) -> Result<()> {
    if pdu.state_key.as_deref() != Some("") {
        return Err(Error::bad_json(format!("{SESSION} takes the empty state key")));
    }
    let new = crate::clinic::parse_session(&pdu.content_json())?;
    let limit = ctx.clinic.kind_limit(new.kind);
    if new.max_participants > limit {
        return Err(Error::bad_json(format!("a {:?} session has at most {limit} participants", new.kind).to_lowercase()));
    }
    let mut therapists = ctx.therapists()?;
    match ctx.session()? {
        None => {
            if !ctx.clinic.is_verified_therapist(&pdu.sender)? {
                return Err(refuse("only verified therapists create sessions"));
            }
            if !therapists.contains(&pdu.sender) {
                therapists.push(pdu.sender.clone());
            }
        }
        Some((old, _)) => {
            if !ctx.role(pdu.sender.as_str())?.is_some_and(Role::is_therapist) {
                return Err(refuse("only the session's therapists change the session"));
            }
            if !old.status.is_live() {
                return Err(refuse(format!("the session is {:?} and can no longer change", old.status).to_lowercase()));
            }
            if old.status != new.status && !old.status.can_become(new.status) {
                return Err(refuse(format!("a session cannot go from {:?} to {:?}", old.status, new.status).to_lowercase()));
            }
            if old.kind != new.kind {
                return Err(refuse("a session's kind cannot change"));
            }
            if (old.starts_at, old.ends_at) == (new.starts_at, new.ends_at) {
                return Ok(());
            }
        }
    }
    if new.status.is_live() {
        for therapist in &therapists {
            check_not_double_booked(ctx, therapist, &new)?;
        }
    }
    Ok(())
}

/// A therapist's live sessions must not overlap. The check reads the therapist's other session
/// rooms, so the writer claims the therapist's bookings until it commits: two rooms booking one
/// therapist at the same moment (through one node or two) are checked one after the other, and
/// the second of two at once is refused, to be tried again.
fn check_not_double_booked(ctx: &PolicyContext<'_>, therapist: &UserId, session: &Session) -> Result<()> {
    if !ctx.room.claim(&format!("bookings of {therapist}"))? {
        return Err(Error::with_status(
            crate::error::ErrorCode::Unknown,
            http::StatusCode::SERVICE_UNAVAILABLE,
            format!("another session of {therapist} is being booked at this moment; try again"),
        ));
    }
    for room in ctx.clinic.booked(therapist, ctx.room_id)? {
        let Some(content) = ctx.rooms.state_content(&room, SESSION, "")? else { continue };
        let Ok(other) = crate::clinic::parse_session(&content) else { continue };
        if other.status.is_live() && other.overlaps(session.starts_at, session.ends_at) {
            return Err(Error::with_status(
                crate::error::ErrorCode::Forbidden,
                http::StatusCode::CONFLICT,
                format!("{therapist} is already booked for \"{}\" at that time", other.title),
            ));
        }
    }
    Ok(())
}

fn check_role(ctx: &PolicyContext<'_>, pdu: &Pdu, session: &Session, session_pdu: &Pdu) -> Result<()> {
    let target = pdu.state_key.as_deref().and_then(role_user).unwrap_or_default();
    let target_id = <&UserId>::try_from(target).map_err(|_| Error::bad_json(format!("the state key of {ROLE} must be `_` followed by a user id")))?;
    let sender_is_therapist = ctx.role(pdu.sender.as_str())?.is_some_and(Role::is_therapist);
    // The session's creator assigns the first roles, their own included.
    let creator_setting_up = pdu.sender == session_pdu.sender && ctx.therapists()?.is_empty();
    if !sender_is_therapist && !creator_setting_up {
        return Err(refuse("only the session's therapists assign roles"));
    }
    let content = pdu.content_json();
    let Some(role) = Role::of(&content) else {
        match content.get("role") {
            None => return Err(Error::bad_json("a role event needs `role` (null removes the role)")),
            Some(role) if !role.is_null() => return Err(Error::bad_json("role must be one of therapist, co_therapist, client, observer")),
            Some(_) => {}
        }
        // Removing a role.
        return Ok(());
    };
    let others = ctx.roles()?.into_iter().filter(|(user, _)| user != target).count();
    if others as u32 + 1 > session.max_participants {
        return Err(refuse(format!("the session is full ({} participants)", session.max_participants)));
    }
    if role.is_therapist() && session.status.is_live() {
        check_not_double_booked(ctx, target_id, session)?;
    }
    Ok(())
}

fn check_membership(ctx: &PolicyContext<'_>, pdu: &Pdu, session: &Session) -> Result<()> {
    let content = pdu.content_json();
    let membership = Membership::of(&content);
    let target = pdu.state_key.as_deref().unwrap_or_default();
    match membership {
        Some(Membership::Join) => {
            // Scheduled participants have a role; others join once a therapist admitted their
            // knock (an invite).
            let role = ctx.role(target)?;
            let admitted = match ctx.room.state("m.room.member", target)? {
                Some(invite) if invite.membership() == Some(Membership::Invite) => answers_knock(ctx, &invite)?,
                _ => false,
            };
            if role.is_none() && !admitted {
                return Err(refuse("only the session's scheduled participants join; knock to wait in the waiting room"));
            }
            if !session.status.is_live() {
                return Err(refuse(format!("the session is {:?}", session.status).to_lowercase()));
            }
            if !role.is_some_and(Role::is_therapist) {
                let opens = session.join_opens_at();
                if ctx.now < opens {
                    return Err(not_open_yet(opens));
                }
                if ctx.now > session.ends_at {
                    return Err(refuse("the session has ended"));
                }
            }
            let joined = ctx
                .rooms
                .joined_members(ctx.room_id)?
                .into_iter()
                .filter(|user| user.as_str() != target)
                .count();
            if joined as u32 + 1 > session.max_participants {
                return Err(refuse(format!("the session is full ({} participants)", session.max_participants)));
            }
            Ok(())
        }
        Some(Membership::Knock) if !session.status.is_live() => Err(refuse(format!("the session is {:?}", session.status).to_lowercase())),
        _ => Ok(()),
    }
}

/// Whether an invite admitted someone from the waiting room: it replaced their knock. (An
/// invite left over from a role that was since removed admits nobody.)
fn answers_knock(ctx: &PolicyContext<'_>, invite: &Pdu) -> Result<bool> {
    let Some(previous) = ctx.rooms.meta(&invite.event_id)?.and_then(|meta| meta.replaces_state) else { return Ok(false) };
    Ok(ctx.rooms.pdu(&previous)?.is_some_and(|knock| knock.membership() == Some(Membership::Knock)))
}

/// The room's therapists and whether its session is live, for the booking index.
pub fn bookings(ctx: &PolicyContext<'_>) -> Result<(Vec<OwnedUserId>, bool)> {
    let live = ctx.session()?.is_some_and(|(s, _)| s.status.is_live());
    Ok((ctx.therapists()?, live))
}

/// The therapists of the room before an event, for [`stage_bookings`].
pub fn therapists(ctx: &PolicyContext<'_>) -> Result<Vec<OwnedUserId>> {
    ctx.therapists()
}
