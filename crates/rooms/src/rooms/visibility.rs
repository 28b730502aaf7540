//! Who may read what of a room. One rule for every read path: a user's client endpoints
//! (`/state`, `/members`, `/messages`, `/context`, `/event`, relations), `/sync` v3, sliding
//! sync, and other servers' history requests (`/event`, `/backfill`, `/get_missing_events`).
//!
//! - A room as a whole ([`ReadView`]): a joined member reads it as it is now, and so does anyone
//!   when it is `world_readable`; a former member — someone whose leave or ban ended a stay as a
//!   joined member — reads it as it was at that leave; everyone else (a knock withdrawn or
//!   declined, an invite refused, a stranger) reads nothing.
//! - Each event ([`Rooms::can_see`]), under the history visibility of the state before it:
//!   `world_readable` to anyone; otherwise to a reader joined at the event, invited at it when
//!   the room is `invited`, or joined now when it is `shared`. A server reads as its users do.

use ruma::{RoomId, ServerName, UserId, events::TimelineEventType};

use super::{EventMeta, Membership, Rooms, UserRoom, state::StateMap};
use crate::{error::Result, events::Pdu, store::StreamPos};

/// Who reads: one user, or another server on behalf of all its users.
#[derive(Clone, Copy, Debug)]
pub enum Reader<'a> {
    User(&'a UserId),
    Server(&'a ServerName),
}

/// A reader's standing in a room now (see [`Rooms::reader_in_room`]).
pub struct ReaderInRoom {
    joined_now: bool,
    /// Joined, and the room's history was never restricted: every event is visible.
    sees_all: bool,
}

impl Reader<'_> {
    /// Whether the member event with this state key is one of the reader's.
    fn owns(&self, state_key: &str) -> bool {
        match self {
            Self::User(user) => user.as_str() == state_key,
            Self::Server(server) => UserId::parse(state_key).is_ok_and(|user| user.server_name() == *server),
        }
    }
}

/// How much of a room a user may read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadView {
    /// All of it, as it is now.
    Current,
    /// As it was when their stay as a member ended: up to that stream position, with the state
    /// of that snapshot.
    AsOfLeave { pos: StreamPos, snapshot: u64 },
}

impl Rooms {
    /// How much of `room_id` `user_id` may read; `None` for nothing at all.
    pub fn read_view(&self, user_id: &UserId, room_id: &RoomId) -> Result<Option<ReadView>> {
        if !self.exists(room_id)? {
            return Ok(None);
        }
        let entry = self.user_room(user_id, room_id)?;
        if entry.as_ref().is_some_and(|entry| entry.membership == Membership::Join) || self.history_visibility(room_id)? == "world_readable" {
            return Ok(Some(ReadView::Current));
        }
        let Some(entry) = entry else { return Ok(None) };
        Ok(self.departure(user_id, &entry)?.map(|meta| ReadView::AsOfLeave { pos: meta.pos, snapshot: meta.state_after }))
    }

    /// The metadata of the leave or ban `entry` names when it ended a stay as a joined member
    /// (the user was joined just before it). A leave after a knock, an invite or an earlier leave
    /// is not one: whoever left that way was no member when they left, and reads as a stranger.
    pub fn departure(&self, user_id: &UserId, entry: &UserRoom) -> Result<Option<EventMeta>> {
        if !matches!(entry.membership, Membership::Leave | Membership::Ban) {
            return Ok(None);
        }
        let Some(meta) = self.meta(&entry.event_id)? else { return Ok(None) };
        let before = self.state_map(meta.state_before)?;
        let joined = self.membership_in(&before, user_id.as_str())? == Membership::Join;
        Ok(joined.then_some(meta))
    }

    /// What deciding visibility needs to know of `reader` in `room_id` now: read once for
    /// all the events of a timeline, not once per event.
    pub fn reader_in_room(&self, reader: Reader<'_>, room_id: &RoomId) -> Result<ReaderInRoom> {
        let joined_now = match reader {
            Reader::User(user) => self.is_joined(room_id, user)?,
            Reader::Server(server) => self.server_joined(room_id, server)?,
        };
        let sees_all = joined_now && self.room(room_id)?.is_some_and(|room| !room.history_ever_restricted);
        Ok(ReaderInRoom { joined_now, sees_all })
    }

    /// Whether `reader` may see `pdu` under the room's history visibility at the event.
    pub fn can_see(&self, reader: Reader<'_>, pdu: &Pdu, meta: &EventMeta) -> Result<bool> {
        let in_room = self.reader_in_room(reader, &pdu.room_id)?;
        self.can_see_in(reader, &in_room, pdu, meta)
    }

    /// [`Self::can_see`] with what [`Self::reader_in_room`] read for the event's room.
    pub fn can_see_in(&self, reader: Reader<'_>, in_room: &ReaderInRoom, pdu: &Pdu, meta: &EventMeta) -> Result<bool> {
        let joined_now = in_room.joined_now;
        // While the history was never restricted, a member sees it all; this spares /sync and
        // /messages a state lookup per event.
        if in_room.sees_all {
            return Ok(true);
        }
        // Visibility and membership are those of the state before the event.
        let state = self.state_map(meta.state_before)?;
        let visibility = match state.get(&("m.room.history_visibility".to_owned(), String::new())) {
            Some(id) => self.pdu(id)?.and_then(|p| p.content_json()["history_visibility"].as_str().map(str::to_owned)),
            None => None,
        }
        .unwrap_or_else(|| "shared".to_owned());
        if visibility == "world_readable" {
            return Ok(true);
        }
        let mut membership = self.best_membership(&state, reader)?;
        // A reader's own membership event counts with the more privileged of its old and new
        // membership, so that people see their own joins, leaves and kicks.
        if pdu.kind == TimelineEventType::RoomMember
            && let Some(target) = pdu.state_key.as_deref().filter(|key| reader.owns(key))
        {
            let before = self.membership_in(&state, target)?;
            let after = membership_of(&pdu.content_json());
            // Including a declined knock, so that the knocker learns the reason.
            if after == Membership::Leave && matches!(before, Membership::Join | Membership::Invite | Membership::Knock) {
                return Ok(true);
            }
            if priority(after) < priority(membership) {
                membership = after;
            }
        }
        Ok(match membership {
            Membership::Join => true,
            Membership::Invite if visibility == "invited" => true,
            _ if visibility == "shared" => joined_now,
            _ => false,
        })
    }

    /// Whether `user_id` may see `pdu` under the room's history visibility.
    pub fn user_can_see(&self, user_id: &UserId, pdu: &Pdu, meta: &EventMeta) -> Result<bool> {
        self.can_see(Reader::User(user_id), pdu, meta)
    }

    /// The event with its metadata, if it exists and `user_id` may see it.
    pub fn visible_event(&self, user_id: &UserId, event_id: &ruma::EventId) -> Result<Option<(Pdu, EventMeta)>> {
        let (Some(pdu), Some(meta)) = (self.pdu(event_id)?, self.meta(event_id)?) else { return Ok(None) };
        Ok(self.user_can_see(user_id, &pdu, &meta)?.then_some((pdu, meta)))
    }

    /// Whether one of `server`'s users is joined to the room now.
    pub fn server_joined(&self, room_id: &RoomId, server: &ServerName) -> Result<bool> {
        Ok(self.members(room_id)?.iter().any(|(user, membership)| *membership == Membership::Join && user.server_name() == server))
    }

    /// Whether one of `server`'s users is joined in the state of `snapshot`.
    pub fn server_joined_in(&self, snapshot: u64, server: &ServerName) -> Result<bool> {
        Ok(self.best_membership(&*self.state_map(snapshot)?, Reader::Server(server))? == Membership::Join)
    }

    /// The current `history_visibility` of a room (`shared` when it has none).
    fn history_visibility(&self, room_id: &RoomId) -> Result<String> {
        Ok(self
            .state_content(room_id, "m.room.history_visibility", "")?
            .and_then(|content| content["history_visibility"].as_str().map(str::to_owned))
            .unwrap_or_else(|| "shared".to_owned()))
    }

    /// A user's membership in `state` (`leave` when they have none).
    fn membership_in(&self, state: &StateMap, user: &str) -> Result<Membership> {
        match state.get(&("m.room.member".to_owned(), user.to_owned())) {
            Some(id) => Ok(self.pdu(id)?.map_or(Membership::Leave, |pdu| membership_of(&pdu.content_json()))),
            None => Ok(Membership::Leave),
        }
    }

    /// The most privileged membership the reader's users have in `state`.
    fn best_membership(&self, state: &StateMap, reader: Reader<'_>) -> Result<Membership> {
        if let Reader::User(user) = reader {
            return self.membership_in(state, user.as_str());
        }
        // A server's users: the member entries are contiguous in the sorted map.
        let mut best = Membership::Leave;
        for ((kind, key), id) in state.range(("m.room.member".to_owned(), String::new())..) {
            if kind != "m.room.member" {
                break;
            }
            if !reader.owns(key) {
                continue;
            }
            let membership = self.pdu(id)?.map_or(Membership::Leave, |pdu| membership_of(&pdu.content_json()));
            if priority(membership) < priority(best) {
                best = membership;
            }
            if best == Membership::Join {
                break;
            }
        }
        Ok(best)
    }
}

fn membership_of(content: &serde_json::Value) -> Membership {
    Membership::of(content).unwrap_or(Membership::Leave)
}

/// Lower is more privileged: of several memberships a reader held, the best one decides.
fn priority(membership: Membership) -> u8 {
    match membership {
        Membership::Join => 0,
        Membership::Invite => 1,
        Membership::Knock => 2,
        Membership::Leave => 3,
        Membership::Ban => 4,
    }
}
