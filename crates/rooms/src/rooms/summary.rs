//! Room summaries (MSC3266, Matrix 1.15): what a room shows someone who may want to join it,
//! under the Matrix rules narrowed by the clinic's. Who sees what: spec/behaviour.md ("Room
//! summaries") and spec/sessions.md ("Room summaries of sessions").

use std::collections::HashMap;

use ruma::{
    EventEncryptionAlgorithm, OwnedMxcUri, OwnedRoomAliasId, OwnedRoomId, RoomId, RoomOrAliasId, RoomVersionId, UInt,
    UserId,
    room::{AllowRule, JoinRule, JoinRuleSummary, RoomSummary, RoomType},
};
use limbic_clinic_model as clinic;
use serde_json::Value as JsonValue;

use super::{Membership, Rooms};
use crate::error::{Error, Result};

/// The state a summary is made of (state key "" each).
const SUMMARY_STATE: &[&str] = &[
    "m.room.create",
    "m.room.join_rules",
    "m.room.name",
    "m.room.topic",
    "m.room.avatar",
    "m.room.canonical_alias",
    "m.room.encryption",
    "m.room.history_visibility",
    "m.room.guest_access",
];

/// A room's summary as one caller may see it, with the caller's membership (`None` when they
/// have none, or when the request carried no access token).
pub struct SummaryView {
    pub summary: RoomSummary,
    pub membership: Option<Membership>,
}

/// How much of a room a caller sees.
enum Shown {
    /// Everything the summary has.
    Full,
    /// What a knocker's waiting room shows: the stripped state of an invite or knock, nothing
    /// else — no member count, no history visibility, no guest access.
    WaitingRoom,
}

impl Rooms {
    /// The summary of a room (by id or local alias) for `caller` (`None`: unauthenticated).
    ///
    /// Unknown rooms, rooms this server is not in, and rooms the caller may not see all answer
    /// the same 404, so that the answer does not tell whether a private room exists.
    pub fn summary(&self, room: &RoomOrAliasId, caller: Option<&UserId>) -> Result<SummaryView> {
        let not_found = || Error::not_found("room not found");
        let room_id = match OwnedRoomId::try_from(room.to_owned()) {
            Ok(room_id) => room_id,
            Err(alias) => self.resolve_alias(&alias)?.ok_or_else(not_found)?,
        };
        if !self.exists(&room_id)? {
            return Err(not_found());
        }
        let membership = match caller {
            Some(user) => self.membership(&room_id, user)?,
            None => None,
        };
        let mut state = HashMap::new();
        for kind in SUMMARY_STATE {
            if let Some(content) = self.state_content(&room_id, kind, "")? {
                state.insert(*kind, content);
            }
        }
        let summary = match self.shown(&room_id, caller, membership, &state)?.ok_or_else(not_found)? {
            Shown::Full => summary_of(&room_id, &state, self.joined_members(&room_id)?.len()),
            Shown::WaitingRoom => {
                state.retain(|kind, _| super::STRIPPED_STATE_TYPES.contains(kind));
                summary_of(&room_id, &state, 0)
            }
        };
        Ok(SummaryView { summary, membership })
    }

    /// What `caller`, with `membership`, may see of the room, if anything.
    fn shown(&self, room_id: &RoomId, caller: Option<&UserId>, membership: Option<Membership>, state: &HashMap<&str, JsonValue>) -> Result<Option<Shown>> {
        // A session's private notes room: its members (the session's therapists) and nobody
        // else, whatever its join rule or history visibility say.
        if self.state_event(room_id, clinic::NOTES_FOR, "")?.is_some() {
            return Ok(matches!(membership, Some(Membership::Join | Membership::Invite)).then_some(Shown::Full));
        }
        let involved = matches!(membership, Some(Membership::Join | Membership::Invite | Membership::Knock));
        if !involved && !self.open_to(caller, state)? {
            return Ok(None);
        }
        let Some(session) = self.state_content(room_id, clinic::SESSION, "")? else { return Ok(Some(Shown::Full)) };
        // A therapy session: its members see it all; invitees and knockers what their waiting
        // room shows them; others that much only if they could knock now (signed in, not
        // banned, the session live and without a passcode) — otherwise nothing.
        Ok(match membership {
            Some(Membership::Join) => Some(Shown::Full),
            Some(Membership::Invite | Membership::Knock) => Some(Shown::WaitingRoom),
            Some(Membership::Ban) => None,
            Some(Membership::Leave) | None => {
                let live = clinic::Session::parse(&session).is_ok_and(|s| s.status.is_live());
                let open = caller.is_some() && live && self.open_to_knocks(room_id)?;
                open.then_some(Shown::WaitingRoom)
            }
        })
    }

    /// Whether the room shows itself to someone who is not in it (MSC3266, as Synapse): public
    /// and knockable rooms and world-readable ones to anyone, restricted ones to members of a
    /// room they name.
    fn open_to(&self, caller: Option<&UserId>, state: &HashMap<&str, JsonValue>) -> Result<bool> {
        let world_readable = history_visibility(state) == Some("world_readable");
        let rule = join_rule(state);
        if world_readable || matches!(rule, JoinRule::Public | JoinRule::Knock | JoinRule::KnockRestricted(_)) {
            return Ok(true);
        }
        let (JoinRule::Restricted(restricted), Some(user)) = (rule, caller) else { return Ok(false) };
        for allow in restricted.allow {
            if let AllowRule::RoomMembership(room) = allow
                && self.is_joined(&room.room_id, user)?
            {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// The room's join rule; `invite` when it has none (as the auth rules read it).
fn join_rule(state: &HashMap<&str, JsonValue>) -> JoinRule {
    state.get("m.room.join_rules").and_then(|c| serde_json::from_value(c.clone()).ok()).unwrap_or(JoinRule::Invite)
}

fn history_visibility<'a>(state: &'a HashMap<&str, JsonValue>) -> Option<&'a str> {
    state.get("m.room.history_visibility")?.get("history_visibility")?.as_str()
}

/// The summary made of `state`; what is not in it is left out, or false.
fn summary_of(room_id: &RoomId, state: &HashMap<&str, JsonValue>, joined: usize) -> RoomSummary {
    let field = |kind: &str, name: &str| state.get(kind).and_then(|c| c.get(name)).and_then(JsonValue::as_str).filter(|s| !s.is_empty());
    let guest_can_join = field("m.room.guest_access", "guest_access") == Some("can_join");
    let world_readable = history_visibility(state) == Some("world_readable");
    let joined = UInt::new_saturating(joined as u64);
    let mut summary = RoomSummary::new(room_id.to_owned(), JoinRuleSummary::from(join_rule(state)), guest_can_join, joined, world_readable);
    summary.name = field("m.room.name", "name").map(str::to_owned);
    summary.topic = field("m.room.topic", "topic").map(str::to_owned);
    summary.avatar_url = field("m.room.avatar", "url").map(OwnedMxcUri::from);
    summary.canonical_alias = field("m.room.canonical_alias", "alias").and_then(|a| OwnedRoomAliasId::try_from(a).ok());
    summary.encryption = field("m.room.encryption", "algorithm").map(EventEncryptionAlgorithm::from);
    summary.room_type = field("m.room.create", "type").map(RoomType::from);
    // A create event without `room_version` is a version 1 room.
    summary.room_version = state
        .get("m.room.create")
        .map(|_| field("m.room.create", "room_version").unwrap_or("1"))
        .and_then(|version| RoomVersionId::try_from(version).ok());
    summary
}
