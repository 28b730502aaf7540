//! Therapy sessions as rooms: verified therapists, the `org.limbic.session` and
//! `org.limbic.session.role` state, and the clinic policy the event pipeline applies after the
//! room version's auth rules — whatever API an event comes through.

pub mod appointments;
pub mod breakouts;
pub mod notes;
mod pipeline;
mod policy;
pub mod sessions;
pub mod subrooms;

use std::sync::Arc;

use ruma::{OwnedRoomId, OwnedUserId, UserId};
use serde::{Deserialize, Serialize};

pub use policy::{PolicyContext, authorize, bookings, therapists};

use crate::{
    error::{Error, Result},
    host::LocalServer,
    store::{Batch, Key, KeyReader, Store, tables},
};

pub use limbic_clinic_model::{
    BREAKOUT, Breakout, CALL_MEMBER, HAND, Kind, NOTE, NOTES_FOR, PASSCODE_FIELD, RECORDING, RECORDING_CONSENT, ROLE, RTC_MEMBER,
    RecordingPolicy, Role, SESSION, Session, Status, role_key, role_user,
};

/// What the clinic's services reach of the rest of the server beyond [`LocalServer`]; the
/// server implements it, so that the clinic names none of the services that consult it.
pub trait ClinicHost: LocalServer {
    fn clinic(&self) -> &Clinic;
    fn appointments(&self) -> &appointments::Appointments;
    fn audit(&self) -> &crate::audit::Audit;
}

/// The server behind an `Arc`, as the API layer holds it.
impl<T: ClinicHost + ?Sized> ClinicHost for Arc<T> {
    fn clinic(&self) -> &Clinic {
        (**self).clinic()
    }
    fn appointments(&self) -> &appointments::Appointments {
        (**self).appointments()
    }
    fn audit(&self) -> &crate::audit::Audit {
        (**self).audit()
    }
}

/// The role `user` holds in the session of `room_id`, if any.
pub fn session_role(rooms: &crate::rooms::Rooms, room_id: &ruma::RoomId, user: &str) -> Result<Option<Role>> {
    Ok(rooms.state_content(room_id, ROLE, &role_key(user))?.as_ref().and_then(Role::of))
}

/// `org.limbic.session` content as the server accepts it: no unknown fields, and the session's
/// own rules (it ends after it starts, has a title, admits someone).
pub fn parse_session(content: &serde_json::Value) -> Result<Session> {
    let session = Session::parse(content).map_err(Error::bad_json)?;
    session.check().map_err(Error::bad_json)?;
    Ok(session)
}

/// `org.limbic.breakout` content as the server accepts it: no unknown fields, and its session
/// room a room id.
pub fn parse_breakout(content: &serde_json::Value) -> Result<(Breakout, OwnedRoomId)> {
    let breakout = Breakout::parse(content).map_err(Error::bad_json)?;
    let session_room = OwnedRoomId::try_from(breakout.session_room.as_str()).map_err(|_| Error::bad_json(format!("invalid {BREAKOUT} content: session_room is not a room id")))?;
    Ok((breakout, session_room))
}

/// A time as `YYYY-MM-DD HH:MM:SS UTC`, for messages and exports.
pub fn format_utc(ms: u64) -> String {
    limbic_clinic_model::UtcTime::from_ms(ms).to_string()
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct TherapistRecord {
    verified_by: String,
    ts: u64,
}

/// The audit entry of a session or role change: `session_created`, `session_status`,
/// `session_rescheduled`, `role_change`. Other edits (a title, say) are not audited.
pub fn audit_change(pdu: &crate::events::Pdu, previous: Option<&crate::events::Pdu>) -> Option<crate::audit::AuditRecord> {
    use crate::audit::AuditRecord;
    let content = pdu.content_json();
    let before = previous.map(|p| p.content_json());
    let record = AuditRecord::new("", &pdu.sender).room(&pdu.room_id);
    let field = |value: &Option<serde_json::Value>, name: &str| value.as_ref().and_then(|v| v.get(name).cloned());
    if pdu.kind.to_string() == ROLE {
        let user = pdu.state_key.as_deref().and_then(role_user)?.to_owned();
        let record = AuditRecord { action: "role_change", ..record.target(user) };
        return Some(record.details(serde_json::json!({ "from": field(&before, "role"), "to": content.get("role") })));
    }
    let (action, details) = match &before {
        None => ("session_created", serde_json::json!({ "status": content.get("status"), "starts_at": content.get("starts_at") })),
        Some(old) if old.get("status") != content.get("status") => {
            ("session_status", serde_json::json!({ "from": old.get("status"), "to": content.get("status") }))
        }
        Some(old) if old.get("starts_at") != content.get("starts_at") || old.get("ends_at") != content.get("ends_at") => (
            "session_rescheduled",
            serde_json::json!({ "from": [old.get("starts_at"), old.get("ends_at")], "to": [content.get("starts_at"), content.get("ends_at")] }),
        ),
        Some(_) => return None,
    };
    Some(AuditRecord { action, ..record }.details(details))
}

/// Clinic records the policy needs beyond room state: verified therapists and each therapist's
/// booked sessions (for double-booking checks).
pub struct Clinic {
    store: Arc<Store>,
    pub limits: crate::config::SessionsConfig,
}

impl Clinic {
    pub fn new(store: Arc<Store>, limits: crate::config::SessionsConfig) -> Self {
        Self { store, limits }
    }

    pub fn is_verified_therapist(&self, user_id: &UserId) -> Result<bool> {
        Ok(self.store.contains(tables::THERAPISTS, user_id.as_bytes())?)
    }

    /// Marks a user as a verified therapist (or revokes it) and audits who did it.
    pub fn set_verified_therapist(&self, audit: &crate::audit::Audit, admin: &UserId, user_id: &UserId, verified: bool) -> Result<()> {
        let mut batch = self.store.batch();
        if verified {
            let record = TherapistRecord { verified_by: admin.to_string(), ts: ruma::MilliSecondsSinceUnixEpoch::now().0.into() };
            batch.put_json(tables::THERAPISTS, user_id.as_bytes(), &record)?;
        } else {
            batch.delete(tables::THERAPISTS, user_id.as_bytes());
        }
        let action = if verified { "therapist_verified" } else { "therapist_revoked" };
        audit.write_with(&self.store, batch, vec![crate::audit::AuditRecord::new(action, admin).target(user_id)])
    }

    /// Stages the argon2 hash of a session's passcode.
    pub fn stage_passcode(&self, batch: &mut Batch, room_id: &ruma::RoomId, passcode: &str) -> Result<()> {
        batch.put(tables::SESSION_PASSCODES, room_id.as_bytes(), crate::users::hash_password(passcode)?.as_bytes());
        Ok(())
    }

    /// Whether `passcode` opens the room (true when the room has none).
    pub fn passcode_matches(&self, room_id: &ruma::RoomId, passcode: Option<&str>) -> Result<bool> {
        let Some(hash) = self.store.get(tables::SESSION_PASSCODES, room_id.as_bytes())? else { return Ok(true) };
        let hash = String::from_utf8(hash).map_err(Error::internal)?;
        Ok(passcode.is_some_and(|p| crate::users::verify_password(p, &hash)))
    }

    /// The private notes room of a session room, if it has one.
    pub fn notes_room(&self, session_room: &ruma::RoomId) -> Result<Option<OwnedRoomId>> {
        Ok(self
            .store
            .get(tables::SESSION_NOTES, session_room.as_bytes())?
            .and_then(|id| String::from_utf8(id).ok())
            .and_then(|id| OwnedRoomId::try_from(id).ok()))
    }

    /// Stages the link from a session room to its notes room, in the notes room's creation.
    pub fn stage_notes_link(&self, batch: &mut Batch, session_room: &ruma::RoomId, notes_room: &ruma::RoomId) {
        batch.put(tables::SESSION_NOTES, session_room.as_bytes(), notes_room.as_bytes());
    }

    /// The participant limit of a session kind, from config.
    pub fn kind_limit(&self, kind: Kind) -> u32 {
        let l = &self.limits;
        match kind {
            Kind::Individual => l.individual,
            Kind::Couples => l.couples,
            Kind::Family => l.family,
            Kind::Group => l.group,
            Kind::Workshop => l.workshop,
            Kind::Support => l.support,
        }
    }

    /// Rooms of live sessions booked for `therapist`, other than `except`.
    fn booked(&self, therapist: &UserId, except: &ruma::RoomId) -> Result<Vec<OwnedRoomId>> {
        let prefix = Key::new().str(therapist.as_str()).into_vec();
        let mut rooms = Vec::new();
        for item in self.store.scan_prefix(tables::THERAPIST_BOOKINGS, prefix, false) {
            let (key, _) = item?;
            let room = KeyReader::new(&key).skip_str().str().map(str::to_owned);
            if let Some(room) = room.and_then(|r| OwnedRoomId::try_from(r).ok())
                && room != except
            {
                rooms.push(room);
            }
        }
        Ok(rooms)
    }

    /// Stages the booking index of a room's therapists after a session or role change.
    pub fn stage_bookings(&self, batch: &mut Batch, room_id: &ruma::RoomId, therapists: &[OwnedUserId], live: bool, previous: &[OwnedUserId]) {
        for user in previous {
            batch.delete(tables::THERAPIST_BOOKINGS, &Key::new().str(user.as_str()).str(room_id.as_str()).into_vec());
        }
        if live {
            for user in therapists {
                batch.put(tables::THERAPIST_BOOKINGS, &Key::new().str(user.as_str()).str(room_id.as_str()).into_vec(), b"");
            }
        }
    }
}

