//! The clinic in the room pipeline: its policy (passcodes, then the clinic rules after the room
//! version's) and its indexer (the therapists' bookings and the audit entries of session and
//! role changes, in the event's own write).

use ruma::{OwnedUserId, RoomId, UserId, events::TimelineEventType, room_version_rules::RoomVersionRules};

use super::{Clinic, PASSCODE_FIELD, PolicyContext, ROLE, Role, SESSION, role_key};
use crate::{
    error::{Error, Result},
    events::{Pdu, PduBuilder},
    rooms::{Indexer, Membership, Policy, RoomView, Rooms, StagedEvent, Staging},
};

impl Clinic {
    fn context<'a>(&'a self, room: &'a dyn RoomView) -> PolicyContext<'a> {
        PolicyContext { clinic: self, rooms: room.rooms(), room_id: room.room_id(), room, now: ruma::MilliSecondsSinceUnixEpoch::now().0.into() }
    }
}

impl Policy for Clinic {
    /// Passcode-protected sessions: a knock or join by anyone but the session's therapists needs
    /// the passcode. The passcode is taken out of the content first, so it is never stored.
    fn prepare(&self, room: &dyn RoomView, sender: &UserId, builder: &mut PduBuilder) -> Result<()> {
        if builder.kind != TimelineEventType::RoomMember {
            return Ok(());
        }
        let passcode = builder.content.as_object_mut().and_then(|c| c.remove(PASSCODE_FIELD)).and_then(|p| p.as_str().map(str::to_owned));
        if !matches!(Membership::of(&builder.content), Some(Membership::Join | Membership::Knock)) || builder.state_key.as_deref() != Some(sender.as_str()) {
            return Ok(());
        }
        let therapist = room.state(ROLE, &role_key(sender.as_str()))?.and_then(|role| Role::of(&role.content_json())).is_some_and(Role::is_therapist);
        if !therapist && !self.passcode_matches(room.room_id(), passcode.as_deref())? {
            return Err(Error::forbidden("this session needs its passcode (org.limbic.passcode)"));
        }
        Ok(())
    }

    /// A passcode is never sent between servers (it would be stored in the event), so a
    /// passcode-protected session admits no knock or join from another server.
    fn prepare_remote(&self, room: &dyn RoomView, pdu: &Pdu) -> Result<()> {
        if pdu.kind != TimelineEventType::RoomMember {
            return Ok(());
        }
        let content = pdu.content_json();
        if content.get(PASSCODE_FIELD).is_some() {
            return Err(Error::forbidden("passcodes are never sent between servers"));
        }
        let mut builder = PduBuilder::state("m.room.member", pdu.state_key.clone().unwrap_or_default(), content);
        self.prepare(room, &pdu.sender, &mut builder)
    }

    fn authorize(&self, room: &dyn RoomView, pdu: &Pdu) -> Result<()> {
        super::authorize(&self.context(room), pdu)
    }

    fn open_to_knocks(&self, room_id: &RoomId) -> Result<bool> {
        self.passcode_matches(room_id, None)
    }
}

impl Indexer for Clinic {
    /// A session or role change moves the therapists' bookings and is audited.
    fn stage(&self, room: &dyn RoomView, event: &StagedEvent<'_>, staging: &mut Staging<'_>) -> Result<()> {
        let kind = event.pdu.kind.to_string();
        if kind != SESSION && kind != ROLE {
            return Ok(());
        }
        let Some(state_key) = event.pdu.state_key.as_deref() else { return Ok(()) };
        let before = Before { room, kind: &kind, state_key, replaced: event.replaced };
        let therapists_before = super::therapists(&self.context(&before))?;
        let (therapists, live) = super::bookings(&self.context(room))?;
        self.stage_bookings(staging.batch(), room.room_id(), &therapists, live, &therapists_before);
        if let Some(record) = super::audit_change(event.pdu, event.replaced) {
            staging.audit(record);
        }
        Ok(())
    }
}

/// The room as it was before a state event: the event's (type, state key) holds what it replaced.
struct Before<'a> {
    room: &'a dyn RoomView,
    kind: &'a str,
    state_key: &'a str,
    replaced: Option<&'a Pdu>,
}

impl RoomView for Before<'_> {
    fn room_id(&self) -> &RoomId {
        self.room.room_id()
    }

    fn rooms(&self) -> &Rooms {
        self.room.rooms()
    }

    fn state(&self, kind: &str, state_key: &str) -> Result<Option<Pdu>> {
        if kind == self.kind && state_key == self.state_key {
            return Ok(self.replaced.cloned());
        }
        self.room.state(kind, state_key)
    }

    fn state_of_type(&self, kind: &str) -> Result<Vec<(String, Pdu)>> {
        let mut state = self.room.state_of_type(kind)?;
        if kind == self.kind {
            state.retain(|(key, _)| key != self.state_key);
            if let Some(replaced) = self.replaced {
                state.push((self.state_key.to_owned(), replaced.clone()));
                state.sort_by(|a, b| a.0.cmp(&b.0));
            }
        }
        Ok(state)
    }

    fn members(&self) -> Result<std::collections::HashMap<OwnedUserId, Membership>> {
        self.room.members()
    }

    fn rules(&self) -> Result<&RoomVersionRules> {
        self.room.rules()
    }

    fn claim(&self, name: &str) -> Result<bool> {
        self.room.claim(name)
    }
}
