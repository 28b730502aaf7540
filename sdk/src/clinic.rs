//! The clinic's event types: therapy sessions as rooms (the repository's `spec/sessions.md`,
//! with a JSON Schema per content in `spec/schemas/`).
//!
//! The types accept unknown fields, so a plugin built against this SDK keeps reading events
//! written by a newer server; the server itself validates what it stores.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::Event;

/// `org.limbic.session` (state key `""`): the session a room is. Content: [`Session`].
pub const SESSION: &str = "org.limbic.session";
/// `org.limbic.session.role` (state key `_@user:server`, see [`role_key`]): a participant's
/// role. Content: [`RoleContent`].
pub const ROLE: &str = "org.limbic.session.role";
/// `org.limbic.breakout` (state key `""`, in a breakout room). Content: [`Breakout`].
pub const BREAKOUT: &str = "org.limbic.breakout";
/// `m.room.member` (state key: the user id): membership.
pub const MEMBER: &str = "m.room.member";
/// `org.matrix.msc3401.call.member` (state key `_@user:server_device` or similar, as MatrixRTC
/// clients send it): a user's membership of the room's call.
pub const CALL_MEMBER: &str = "org.matrix.msc3401.call.member";
/// `m.room.message`: a chat message.
pub const MESSAGE: &str = "m.room.message";

/// The state key of a user's role: the user id behind an underscore (`_@ann:clinic.example`).
/// Up to room version 11, state keys starting with `@` may only be sent by that user.
pub fn role_key(user_id: &str) -> String {
    format!("_{user_id}")
}

/// The user a role state key is about: `_@ann:clinic.example` → `@ann:clinic.example`; `None`
/// for anything else.
pub fn role_user(state_key: &str) -> Option<&str> {
    state_key.strip_prefix('_').filter(|user| user.starts_with('@'))
}

/// Every user with a role in a session room, from its state events (e.g.
/// [`rooms::room_state`](crate::rooms::room_state)), sorted by user id. Removed roles
/// (`{"role": null}`) and malformed role events are left out.
pub fn roles(state: &[Event]) -> BTreeMap<String, Role> {
    state
        .iter()
        .filter(|event| event.event_type == ROLE)
        .filter_map(|event| {
            let user = role_user(event.state_key.as_deref()?)?;
            let role = event.content::<RoleContent>().ok()?.role?;
            Some((user.to_owned(), role))
        })
        .collect()
}

/// The content of `org.limbic.session`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// What kind of session it is; never changes.
    pub kind: Kind,
    /// The title, e.g. `Weekly group`.
    pub title: String,
    /// Start, in ms since the Unix epoch.
    pub starts_at: u64,
    /// End, in ms since the Unix epoch (after `starts_at`).
    pub ends_at: u64,
    /// The IANA time zone it was scheduled in, e.g. `Europe/Berlin`.
    pub timezone: String,
    /// Where it is in the status workflow.
    pub status: Status,
    /// How many participants (therapists included) it admits.
    pub max_participants: u32,
    /// Minutes before the start from which participants other than therapists may join.
    #[serde(default = "default_join_window")]
    pub join_window_minutes: u32,
    /// Whether the session may be recorded.
    #[serde(default)]
    pub recording_policy: RecordingPolicy,
}

fn default_join_window() -> u32 {
    15
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
    pub fn is_multi_client(self) -> bool {
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
    /// Whether the workflow allows going from `self` to `next`.
    pub fn can_become(self, next: Status) -> bool {
        use Status::*;
        matches!(
            (self, next),
            (Scheduled, Open) | (Open, InProgress) | (InProgress, Completed) | (Scheduled | Open, Cancelled | NoShow)
        )
    }

    /// Whether the session is still live (scheduled, open or in progress).
    pub fn is_live(self) -> bool {
        matches!(self, Status::Scheduled | Status::Open | Status::InProgress)
    }
}

/// Whether a session may be recorded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordingPolicy {
    /// Never.
    #[default]
    Forbidden,
    /// With every participant's consent.
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

/// The content of `org.limbic.session.role`: `{"role": "client"}`, or `{"role": null}` for a
/// removed role.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleContent {
    /// The role; `None` once it was removed.
    pub role: Option<Role>,
}

/// The content of `org.limbic.breakout`, in a breakout room of a session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Breakout {
    /// The session room it belongs to.
    pub session_room: String,
    /// Its name, e.g. `Pairs A`.
    pub name: String,
    /// Whether it was closed (final).
    #[serde(default)]
    pub closed: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(event_type: &str, state_key: &str, content: &str) -> Event {
        Event {
            event_id: format!("${state_key}"),
            room_id: "!r:s".into(),
            sender: "@t:s".into(),
            event_type: event_type.into(),
            state_key: Some(state_key.into()),
            content: content.into(),
            origin_server_ts: 1,
        }
    }

    #[test]
    fn session_content() {
        let session: Session = serde_json::from_str(
            r#"{"kind": "group", "title": "T", "starts_at": 1, "ends_at": 2, "timezone": "UTC",
                "status": "in_progress", "max_participants": 12, "future_field": 1}"#,
        )
        .unwrap();
        assert_eq!(session.kind, Kind::Group);
        assert_eq!(session.status, Status::InProgress);
        assert_eq!(session.join_window_minutes, 15);
        assert_eq!(session.recording_policy, RecordingPolicy::Forbidden);
        assert!(session.status.can_become(Status::Completed));
        assert!(!Status::Completed.can_become(Status::Open));
        let json = serde_json::to_value(&session).unwrap();
        assert_eq!(json["status"], "in_progress");
        assert_eq!(json["recording_policy"], "forbidden");
    }

    #[test]
    fn roles_from_state() {
        let events = [
            state(ROLE, "_@t:s", r#"{"role": "therapist"}"#),
            state(ROLE, "_@c:s", r#"{"role": "client"}"#),
            state(ROLE, "_@gone:s", r#"{"role": null}"#),
            state(ROLE, "@bad:s", r#"{"role": "client"}"#),
            state(ROLE, "_@odd:s", r#"{"role": "chef"}"#),
            state(MEMBER, "@t:s", r#"{"membership": "join"}"#),
        ];
        let roles = roles(&events);
        assert_eq!(
            roles.into_iter().collect::<Vec<_>>(),
            [("@c:s".to_string(), Role::Client), ("@t:s".to_string(), Role::Therapist)]
        );
        assert_eq!(role_user("_@a:b"), Some("@a:b"));
        assert_eq!(role_user("@a:b"), None);
        assert_eq!(role_key("@a:b"), "_@a:b");
        assert_eq!(serde_json::to_string(&RoleContent { role: None }).unwrap(), r#"{"role":null}"#);
    }

    #[test]
    fn breakout_content() {
        let breakout: Breakout = serde_json::from_str(r#"{"session_room": "!s:x", "name": "A"}"#).unwrap();
        assert!(!breakout.closed);
    }
}
