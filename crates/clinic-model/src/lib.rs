//! The clinic's event contents: therapy sessions as rooms (the repository's `spec/sessions.md`,
//! with a JSON Schema per content in `spec/schemas/`). One model for the server and the plugin
//! SDK, so that the two cannot drift apart.
//!
//! The types accept unknown fields, so that a plugin built against an older SDK keeps reading
//! what a newer server writes. The server is strict about what it accepts: each content type has
//! `FIELDS` (its field names as serialized), `unknown_fields(content)` and `parse(content)`, which
//! refuses unknown fields, and the types with rules beyond their shape have `check()`.
//!
//! Room and user ids are plain strings here; the server turns them into its own id types (and
//! refuses malformed ones) where it needs them.

#![warn(missing_docs)]

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::Value;

/// `org.limbic.session` (state key `""`): the session a room is. Content: [`Session`].
pub const SESSION: &str = "org.limbic.session";
/// `org.limbic.session.role` (state key `_@user:server`, see [`role_key`]): a participant's role.
/// Content: [`RoleContent`].
pub const ROLE: &str = "org.limbic.session.role";
/// `org.limbic.session.note` (state key: the note id): a clinical note, `{"body": "..."}`. Only
/// ever in a session's private notes room.
pub const NOTE: &str = "org.limbic.session.note";
/// `org.limbic.session.notes_for` (state key `""`, in a notes room): `{"room_id": <session
/// room>}`.
pub const NOTES_FOR: &str = "org.limbic.session.notes_for";
/// `org.limbic.breakout` (state key `""`, in a breakout room). Content: [`Breakout`].
pub const BREAKOUT: &str = "org.limbic.breakout";
/// `org.limbic.recording` (state key `""`): whether the session's call is being recorded, set by
/// the server for the therapist who started or stopped it. Content: [`Recording`].
pub const RECORDING: &str = "org.limbic.recording";
/// `org.limbic.recording.consent` (state key: the participant's own user id): their consent to
/// the call being recorded. Only they set it. Content: [`RecordingConsent`].
pub const RECORDING_CONSENT: &str = "org.limbic.recording.consent";
/// `org.limbic.hand` (state key: the participant's own user id): a raised hand. Only they set it.
/// Content: [`Hand`].
pub const HAND: &str = "org.limbic.hand";
/// `org.matrix.msc3401.call.member` (state key `_@user:server_DEVICE` or similar, as MatrixRTC
/// clients send it): a user's membership of the room's call.
pub const CALL_MEMBER: &str = "org.matrix.msc3401.call.member";
/// `org.matrix.msc4143.rtc.member`: MSC4143's per-device RTC membership, the successor of
/// [`CALL_MEMBER`], owned the same way.
pub const RTC_MEMBER: &str = "org.matrix.msc4143.rtc.member";
/// The `m.room.member` content field a knock or join carries a session's passcode in. The server
/// removes it before the event is built, so it is never stored or sent anywhere.
pub const PASSCODE_FIELD: &str = "org.limbic.passcode";

/// How many minutes before the start participants may join when a session does not say
/// ([`Session::join_window_minutes`]).
pub const DEFAULT_JOIN_WINDOW_MINUTES: u32 = 15;

/// The state key of a user's role: the user id behind an underscore (`_@ann:clinic.example`).
/// Room versions up to 11 reserve state keys starting with `@` for their own user, so roles use
/// `_@user:server` (as MatrixRTC does for call members).
pub fn role_key(user_id: &str) -> String {
    format!("_{user_id}")
}

/// The user a role state key is about: `_@ann:clinic.example` → `@ann:clinic.example`; `None` for
/// anything else.
pub fn role_user(state_key: &str) -> Option<&str> {
    state_key.strip_prefix('_').filter(|user| user.starts_with('@'))
}

/// The fields of `content` (a JSON object) that are not in `fields`, in key order. Empty when
/// `content` is not an object: that is for deserialization to refuse.
pub fn unknown_fields(content: &Value, fields: &[&str]) -> Vec<String> {
    match content.as_object() {
        Some(object) => object.keys().filter(|key| !fields.contains(&key.as_str())).cloned().collect(),
        None => Vec::new(),
    }
}

/// Deserializes `content` into `T`, refusing anything but an object (serde would take an array
/// for a struct) and fields outside `fields` first. The errors read like serde's for
/// `deny_unknown_fields`, behind `invalid <event type> content: `.
fn parse_strict<T: DeserializeOwned>(event_type: &str, content: &Value, fields: &[&str]) -> Result<T, String> {
    if !content.is_object() {
        return Err(format!("invalid {event_type} content: expected a JSON object"));
    }
    if let Some(field) = unknown_fields(content, fields).first() {
        let expected = match fields {
            [] => "there are no fields".to_owned(),
            [one] => format!("expected `{one}`"),
            [a, b] => format!("expected `{a}` or `{b}`"),
            _ => format!("expected one of {}", fields.iter().map(|f| format!("`{f}`")).collect::<Vec<_>>().join(", ")),
        };
        return Err(format!("invalid {event_type} content: unknown field `{field}`, {expected}"));
    }
    T::deserialize(content).map_err(|e| format!("invalid {event_type} content: {e}"))
}

/// `FIELDS`, `unknown_fields` and the strict `parse` of a content type.
macro_rules! strict_content {
    ($ty:ident, $event_type:expr, [$($field:literal),* $(,)?]) => {
        impl $ty {
            /// The content's field names as serialized: what the server accepts. A test checks
            /// them against a serialized value and the JSON Schema in `spec/schemas/`.
            pub const FIELDS: &'static [&'static str] = &[$($field),*];

            /// The fields of `content` that are not in [`FIELDS`](Self::FIELDS).
            pub fn unknown_fields(content: &Value) -> Vec<String> {
                unknown_fields(content, Self::FIELDS)
            }

            #[doc = concat!(
                "Parses `", stringify!($ty), "` content strictly, as the server accepts it: a JSON ",
                "object without unknown fields (deserializing with serde accepts those). The error ",
                "says what is wrong, behind `invalid <event type> content: `."
            )]
            pub fn parse(content: &Value) -> Result<Self, String> {
                parse_strict($event_type, content, Self::FIELDS)
            }
        }
    };
}

/// The kind of a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// One client.
    Individual,
    /// Two partners.
    Couples,
    /// A family.
    Family,
    /// Group therapy.
    Group,
    /// A workshop.
    Workshop,
    /// A support group.
    Support,
}

impl Kind {
    /// Sessions with several clients (family, group, workshop, support); they may split into
    /// breakout rooms.
    pub fn allows_breakouts(self) -> bool {
        matches!(self, Kind::Family | Kind::Group | Kind::Workshop | Kind::Support)
    }
}

/// The status of a session: `scheduled → open → in_progress → completed`, and `cancelled` or
/// `no_show` from `scheduled` or `open`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Planned.
    Scheduled,
    /// Open for joining.
    Open,
    /// Running.
    InProgress,
    /// Finished normally (final).
    Completed,
    /// Called off (final).
    Cancelled,
    /// Nobody came (final).
    NoShow,
}

impl Status {
    /// Whether the workflow allows going from `self` to `next`: scheduled → open → in_progress →
    /// completed; cancelled and no_show from scheduled or open. Nothing else (staying put is not
    /// a transition).
    pub fn can_become(self, next: Status) -> bool {
        use Status::*;
        matches!(
            (self, next),
            (Scheduled, Open) | (Open, InProgress) | (InProgress, Completed) | (Scheduled | Open, Cancelled | NoShow)
        )
    }

    /// Whether the session is still live (scheduled, open or in progress): it holds its
    /// therapists' time.
    pub fn is_live(self) -> bool {
        matches!(self, Status::Scheduled | Status::Open | Status::InProgress)
    }
}

/// Whether a session's call may be recorded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordingPolicy {
    /// Never (the default).
    #[default]
    Forbidden,
    /// While every participant in the call consents.
    WithConsent,
}

/// A participant's role in a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Leads the session (power level 100).
    Therapist,
    /// Assists (power level 50).
    CoTherapist,
    /// A client (power level 0).
    Client,
    /// Watches, e.g. a supervisor in training (power level 0).
    Observer,
}

impl Role {
    /// The role an `org.limbic.session.role` content gives: `None` when `role` is absent, `null`
    /// (removed) or not a role.
    pub fn of(content: &Value) -> Option<Role> {
        Role::deserialize(content.get("role")?).ok()
    }

    /// Therapists and co-therapists.
    pub fn is_therapist(self) -> bool {
        matches!(self, Role::Therapist | Role::CoTherapist)
    }

    /// The power level the role maps to in the session room.
    pub fn power_level(self) -> i64 {
        match self {
            Role::Therapist => 100,
            Role::CoTherapist => 50,
            Role::Client | Role::Observer => 0,
        }
    }
}

/// The content of `org.limbic.session` (state key `""`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Session {
    /// What kind of session it is; never changes.
    pub kind: Kind,
    /// The title, e.g. `Weekly group`.
    pub title: String,
    /// Start, in ms since the Unix epoch.
    pub starts_at: u64,
    /// End, in ms since the Unix epoch (after `starts_at`).
    pub ends_at: u64,
    /// The IANA time zone it was scheduled in, e.g. `Europe/Berlin` (for display; the server
    /// does not check it).
    pub timezone: String,
    /// Where it is in the status workflow.
    pub status: Status,
    /// How many participants (therapists included) it admits.
    pub max_participants: u32,
    /// Minutes before the start from which participants other than therapists may join
    /// (default [`DEFAULT_JOIN_WINDOW_MINUTES`]).
    #[serde(default = "default_join_window")]
    pub join_window_minutes: u32,
    /// Whether the session's call may be recorded (default: forbidden).
    #[serde(default)]
    pub recording_policy: RecordingPolicy,
}

fn default_join_window() -> u32 {
    DEFAULT_JOIN_WINDOW_MINUTES
}

strict_content!(
    Session,
    SESSION,
    [
        "kind",
        "title",
        "starts_at",
        "ends_at",
        "timezone",
        "status",
        "max_participants",
        "join_window_minutes",
        "recording_policy"
    ]
);

impl Session {
    /// The rules beyond the content's shape that need nothing else: it ends after it starts, has
    /// a title that is not blank, and admits at least one participant. (The kind's participant
    /// limit is the server's config.)
    pub fn check(&self) -> Result<(), String> {
        if self.starts_at >= self.ends_at {
            return Err("a session must end after it starts".into());
        }
        if self.title.trim().is_empty() {
            return Err("a session needs a title".into());
        }
        if self.max_participants == 0 {
            return Err("max_participants must be at least 1".into());
        }
        Ok(())
    }

    /// Whether the session overlaps the time from `starts_at` to `ends_at` (ms; ends exclusive).
    pub fn overlaps(&self, starts_at: u64, ends_at: u64) -> bool {
        self.starts_at < ends_at && starts_at < self.ends_at
    }

    /// When participants other than therapists may start joining (ms since the epoch).
    pub fn join_opens_at(&self) -> u64 {
        self.starts_at.saturating_sub(u64::from(self.join_window_minutes) * 60_000)
    }

    /// Whether a scheduled participant may join at `now` (ms since the epoch): the session is
    /// live and `now` is between [`join_opens_at`](Self::join_opens_at) and the end.
    pub fn join_window_open(&self, now: u64) -> bool {
        self.status.is_live() && (self.join_opens_at()..=self.ends_at).contains(&now)
    }
}

/// The content of `org.limbic.session.role`: `{"role": "client"}`, or `{"role": null}` for a
/// removed role.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RoleContent {
    /// The role; `None` once it was removed (`null`, or absent when deserializing).
    pub role: Option<Role>,
}

strict_content!(RoleContent, ROLE, ["role"]);

/// The content of `org.limbic.breakout` (state key `""`, in a breakout room of a session).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Breakout {
    /// The session room it belongs to (a room id); never changes.
    pub session_room: String,
    /// Its name, e.g. `Pairs A`.
    pub name: String,
    /// Whether it was closed (final).
    #[serde(default)]
    pub closed: bool,
}

strict_content!(Breakout, BREAKOUT, ["session_room", "name", "closed"]);

impl Breakout {
    /// The rule beyond the content's shape: a name that is not blank. (That `session_room` is a
    /// room id, and a session's, is the server's to check.)
    pub fn check(&self) -> Result<(), String> {
        if self.name.trim().is_empty() {
            return Err("a breakout room needs a name".into());
        }
        Ok(())
    }
}

/// The content of `org.limbic.recording` (state key `""`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Recording {
    /// True from the start of a recording until it stops.
    pub recording: bool,
    /// The therapist who started the recording (while recording) or stopped it; when a
    /// participant's consent stopped it, the therapist who started it.
    pub by: String,
    /// Why the recording stopped (only when `recording` is false), e.g. `the session ended`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped_because: Option<String>,
}

strict_content!(Recording, RECORDING, ["recording", "by", "stopped_because"]);

/// The content of `org.limbic.recording.consent` (state key: the participant's user id).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RecordingConsent {
    /// True: the participant consents; false: they do not, or withdraw their consent.
    pub consent: bool,
}

strict_content!(RecordingConsent, RECORDING_CONSENT, ["consent"]);

/// The content of `org.limbic.hand` (state key: the participant's user id).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Hand {
    /// True: the hand is raised; false: lowered.
    pub raised: bool,
}

strict_content!(Hand, HAND, ["raised"]);

/// A moment in UTC, broken down to the second (proleptic Gregorian calendar): how the clinic
/// shows session times (`2026-03-02 14:00:00 UTC`) in messages, exports and plugins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UtcTime {
    /// The year, e.g. 2026.
    pub year: i64,
    /// 1 to 12.
    pub month: u32,
    /// 1 to 31.
    pub day: u32,
    /// 0 to 23.
    pub hour: u32,
    /// 0 to 59.
    pub minute: u32,
    /// 0 to 59.
    pub second: u32,
}

impl UtcTime {
    /// The UTC time of `ms` milliseconds since the Unix epoch.
    pub fn from_ms(ms: u64) -> Self {
        let secs = ms / 1000;
        let (year, month, day) = civil_from_days((secs / 86_400) as i64);
        let rest = (secs % 86_400) as u32;
        Self { year, month, day, hour: rest / 3600, minute: rest % 3600 / 60, second: rest % 60 }
    }
}

/// `YYYY-MM-DD HH:MM:SS UTC`.
impl std::fmt::Display for UtcTime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC", self.year, self.month, self.day, self.hour, self.minute, self.second)
    }
}

/// The date of a day number (days since 1970-01-01), after Howard Hinnant's `civil_from_days`.
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

#[cfg(test)]
mod tests;
