//! Therapy sessions as rooms: verified therapists, the `org.limbic.session` and
//! `org.limbic.session.role` state, and the clinic policy the event pipeline applies after the
//! room version's auth rules — whatever API an event comes through.

pub mod appointments;
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
    store::{Batch, Key, KeyReader, Store, tables},
};

pub const SESSION: &str = "org.limbic.session";
pub const ROLE: &str = "org.limbic.session.role";
/// A clinical note (state key: the note id), only ever in a session's private notes room.
pub const NOTE: &str = "org.limbic.session.note";
/// The membership-content field a knock or join carries a session passcode in. The pipeline
/// removes it before the event is built, so it is never stored or sent anywhere.
pub const PASSCODE_FIELD: &str = "org.limbic.passcode";
/// In a notes room: `{"room_id": <session room>}`.
pub const NOTES_FOR: &str = "org.limbic.session.notes_for";
/// A MatrixRTC call membership (state key `_@user:server_DEVICE`), sent by participants.
pub const CALL_MEMBER: &str = "org.matrix.msc3401.call.member";
/// MSC4143's per-device RTC membership, the successor of [`CALL_MEMBER`]; owned the same way.
pub const RTC_MEMBER: &str = "org.matrix.msc4143.rtc.member";
/// A participant's consent to the session's call being recorded (state key: their user id):
/// `{"consent": bool}`. Only they set it.
pub const RECORDING_CONSENT: &str = "org.limbic.recording.consent";
/// Whether the session's call is being recorded (state key ""): `{"recording": bool, "by":
/// <therapist>}`, set by the server for the therapist who started it.
pub const RECORDING: &str = "org.limbic.recording";
/// A participant's raised hand (state key: their user id): `{"raised": bool}`. Only they set it.
pub const HAND: &str = "org.limbic.hand";
/// In a breakout room: `{"session_room", "name", "closed"}`.
pub const BREAKOUT: &str = "org.limbic.breakout";

/// The state key of a user's role. Room versions up to 11 reserve state keys starting with `@`
/// for their own user, so roles use `_@user:server` (as MatrixRTC does for call members).
pub fn role_key(user_id: &str) -> String {
    format!("_{user_id}")
}

/// The role `user` holds in the session of `room_id`, if any.
pub fn session_role(rooms: &crate::rooms::Rooms, room_id: &ruma::RoomId, user: &str) -> Result<Option<Role>> {
    Ok(rooms.state_content(room_id, ROLE, &role_key(user))?.as_ref().and_then(Role::of))
}

/// The user a role state key is about.
pub fn role_user(state_key: &str) -> Option<&str> {
    state_key.strip_prefix('_').filter(|user| user.starts_with('@'))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Individual,
    Couples,
    Family,
    Group,
    Workshop,
    Support,
}

impl Kind {
    /// Sessions with several clients may split into breakout rooms.
    pub fn allows_breakouts(self) -> bool {
        matches!(self, Kind::Family | Kind::Group | Kind::Workshop | Kind::Support)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Scheduled,
    Open,
    InProgress,
    Completed,
    Cancelled,
    NoShow,
}

impl Status {
    /// The workflow: scheduled → open → in_progress → completed; cancelled and no_show from
    /// scheduled or open. Nothing else.
    pub fn can_become(self, next: Status) -> bool {
        use Status::*;
        matches!(
            (self, next),
            (Scheduled, Open) | (Open, InProgress) | (InProgress, Completed) | (Scheduled | Open, Cancelled | NoShow)
        )
    }

    /// Whether the session still holds its therapists' time.
    pub fn is_live(self) -> bool {
        matches!(self, Status::Scheduled | Status::Open | Status::InProgress)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Therapist,
    CoTherapist,
    Client,
    Observer,
}

impl Role {
    /// The role an `org.limbic.role` content gives (`None` when it is absent or removed).
    pub fn of(content: &serde_json::Value) -> Option<Role> {
        serde_json::from_value(content.get("role")?.clone()).ok()
    }

    pub fn is_therapist(self) -> bool {
        matches!(self, Role::Therapist | Role::CoTherapist)
    }

    /// The power level a role maps to.
    pub fn power_level(self) -> i64 {
        match self {
            Role::Therapist => 100,
            Role::CoTherapist => 50,
            Role::Client | Role::Observer => 0,
        }
    }
}

/// The content of `org.limbic.session` (state key "").
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Session {
    pub kind: Kind,
    pub title: String,
    pub starts_at: u64,
    pub ends_at: u64,
    pub timezone: String,
    pub status: Status,
    pub max_participants: u32,
    /// Minutes before the start from which scheduled participants may join.
    #[serde(default = "default_join_window")]
    pub join_window_minutes: u32,
    #[serde(default)]
    pub recording_policy: RecordingPolicy,
}

fn default_join_window() -> u32 {
    15
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordingPolicy {
    #[default]
    Forbidden,
    WithConsent,
}

impl Session {
    pub fn parse(content: &serde_json::Value) -> Result<Self> {
        let session: Session = serde_json::from_value(content.clone())
            .map_err(|e| Error::bad_json(format!("invalid {SESSION} content: {e}")))?;
        if session.starts_at >= session.ends_at {
            return Err(Error::bad_json("a session must end after it starts"));
        }
        if session.title.trim().is_empty() {
            return Err(Error::bad_json("a session needs a title"));
        }
        if session.max_participants == 0 {
            return Err(Error::bad_json("max_participants must be at least 1"));
        }
        Ok(session)
    }

    pub fn overlaps(&self, starts_at: u64, ends_at: u64) -> bool {
        self.starts_at < ends_at && starts_at < self.ends_at
    }

    /// When participants other than therapists may start joining.
    pub fn join_opens_at(&self) -> u64 {
        self.starts_at.saturating_sub(u64::from(self.join_window_minutes) * 60_000)
    }

    /// Whether a scheduled participant may join at `now` (ms since the epoch).
    pub fn join_window_open(&self, now: u64) -> bool {
        self.status.is_live() && (self.join_opens_at()..=self.ends_at).contains(&now)
    }
}

/// The content of `org.limbic.breakout` (state key "" in a breakout room).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Breakout {
    pub session_room: OwnedRoomId,
    pub name: String,
    #[serde(default)]
    pub closed: bool,
}

impl Breakout {
    pub fn parse(content: &serde_json::Value) -> Result<Self> {
        serde_json::from_value(content.clone()).map_err(|e| Error::bad_json(format!("invalid {BREAKOUT} content: {e}")))
    }
}

/// A time as `YYYY-MM-DD HH:MM:SS UTC`, for messages and exports.
pub fn format_utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC", rest / 3600, rest % 3600 / 60, rest % 60)
}

/// (year, month, day) of a day count since 1970-01-01 (Howard Hinnant's civil_from_days).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
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
            batch.put_json(&self.store, tables::THERAPISTS, user_id.as_bytes(), &record)?;
        } else {
            batch.delete(&self.store, tables::THERAPISTS, user_id.as_bytes());
        }
        let action = if verified { "therapist_verified" } else { "therapist_revoked" };
        audit.write_with(&self.store, batch, vec![crate::audit::AuditRecord::new(action, admin).target(user_id)])
    }

    /// Stages the argon2 hash of a session's passcode.
    pub fn stage_passcode(&self, batch: &mut Batch, room_id: &ruma::RoomId, passcode: &str) -> Result<()> {
        batch.put(&self.store, tables::SESSION_PASSCODES, room_id.as_bytes(), crate::users::hash_password(passcode)?.as_bytes());
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
        batch.put(&self.store, tables::SESSION_NOTES, session_room.as_bytes(), notes_room.as_bytes());
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
            batch.delete(&self.store, tables::THERAPIST_BOOKINGS, &Key::new().str(user.as_str()).str(room_id.as_str()).into_vec());
        }
        if live {
            for user in therapists {
                batch.put(&self.store, tables::THERAPIST_BOOKINGS, &Key::new().str(user.as_str()).str(room_id.as_str()).into_vec(), b"");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{civil_from_days, format_utc};

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(format_utc(1_709_210_096_000), "2024-02-29 12:34:56 UTC");
    }
}
