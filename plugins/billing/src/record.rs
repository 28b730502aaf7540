//! What billing remembers about a session room: the session, its roles, when it reached each
//! status, and when each user was in the room or in its call.
//!
//! Everything here is idempotent under the at-least-once delivery of `on-event`: presence marks
//! are kept per event id (a replayed event changes nothing), the first time a status was seen
//! wins, and the session content and roles follow the newest event by `origin_server_ts` (a
//! replayed older event does not undo a newer one).

use std::collections::BTreeMap;

use limbic_plugin_sdk::{
    Event,
    clinic::{self, Kind, Role, RoleContent, Session, Status},
    serde_json,
};
use serde::{Deserialize, Serialize};

/// The session as its newest `org.limbic.session` event describes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    /// The kind of session.
    pub kind: Kind,
    /// Its title.
    pub title: String,
    /// Scheduled start, ms since the epoch.
    pub starts_at: u64,
    /// Scheduled end, ms since the epoch.
    pub ends_at: u64,
    /// The current status.
    pub status: Status,
    /// `origin_server_ts` of the event this comes from.
    pub ts: u64,
    /// The event this comes from.
    pub event_id: String,
}

/// A user's role, from their newest `org.limbic.session.role` event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleEntry {
    /// `None` once the role was removed.
    pub role: Option<Role>,
    /// `origin_server_ts` of the event.
    pub ts: u64,
    /// The event.
    pub event_id: String,
}

/// The channel a presence mark is about.
pub const ROOM_CHANNEL: &str = "room";

/// One observation of a user's presence: at `ts` (the event's `origin_server_ts`) the user was
/// (`present`) or was not in the room (`channel` = `room`) or in the call with one device
/// (`channel` = `call:<state key>`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    /// The event the mark comes from; a mark is kept once per event.
    pub event_id: String,
    /// The user.
    pub user_id: String,
    /// `room`, or `call:<state key of the call member event>`.
    pub channel: String,
    /// When.
    pub ts: u64,
    /// In (joined / in the call) or out.
    pub present: bool,
}

/// Everything billing keeps about a session room (kv `session:<room id>`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The session, once an `org.limbic.session` event was seen.
    #[serde(default)]
    pub session: Option<SessionInfo>,
    /// The first time each status was seen (ms since the epoch).
    #[serde(default)]
    pub statuses: BTreeMap<Status, u64>,
    /// Each user's role.
    #[serde(default)]
    pub roles: BTreeMap<String, RoleEntry>,
    /// Presence observations, in the order they arrived.
    #[serde(default)]
    pub marks: Vec<Mark>,
}

/// The user a call member state key is about: `_@ann:clinic.example_DEVICE`,
/// `@ann:clinic.example_DEVICE`, `_@ann:clinic.example_DEVICE_m.call` or (legacy)
/// `@ann:clinic.example` → `@ann:clinic.example`. A server name never contains `_`, so the user
/// id ends at the first `_` after the `:`.
pub fn call_user(state_key: &str) -> Option<&str> {
    let key = state_key.strip_prefix('_').unwrap_or(state_key);
    if !key.starts_with('@') {
        return None;
    }
    let colon = key.find(':')?;
    let end = key[colon + 1..].find('_').map_or(key.len(), |i| colon + 1 + i);
    (colon > 1 && end > colon + 1).then(|| &key[..end])
}

/// Whether call member content says the device is in the call: a non-empty object; legacy
/// content with a `memberships` list is in the call while the list is not empty.
pub fn in_call(content: &serde_json::Value) -> bool {
    let Some(object) = content.as_object() else { return false };
    match object.get("memberships") {
        Some(memberships) => memberships.as_array().is_some_and(|list| !list.is_empty()),
        None => !object.is_empty(),
    }
}

impl Record {
    /// Takes an event into account; returns whether the record changed. Events of other types,
    /// malformed ones and call membership sent by someone else than the user it is about are
    /// ignored.
    pub fn apply(&mut self, event: &Event) -> bool {
        let Some(state_key) = event.state_key.as_deref() else { return false };
        match event.event_type.as_str() {
            clinic::SESSION if state_key.is_empty() => match event.content::<Session>() {
                Ok(session) => self.apply_session(event, &session),
                Err(_) => false,
            },
            clinic::ROLE => match (clinic::role_user(state_key), event.content::<RoleContent>()) {
                (Some(user), Ok(content)) => self.apply_role(event, user, content.role),
                _ => false,
            },
            clinic::MEMBER if state_key.starts_with('@') => {
                let joined = event
                    .content_json()
                    .is_ok_and(|content| content.get("membership").and_then(|m| m.as_str()) == Some("join"));
                self.mark(event, state_key, ROOM_CHANNEL.to_owned(), joined)
            }
            clinic::CALL_MEMBER => match call_user(state_key) {
                Some(user) if user == event.sender => {
                    let present = event.content_json().is_ok_and(|content| in_call(&content));
                    self.mark(event, user, format!("call:{state_key}"), present)
                }
                _ => false,
            },
            _ => false,
        }
    }

    fn apply_session(&mut self, event: &Event, session: &Session) -> bool {
        let ts = event.origin_server_ts;
        let mut changed = false;
        let first = self.statuses.entry(session.status).or_insert_with(|| {
            changed = true;
            ts
        });
        if ts < *first {
            *first = ts;
            changed = true;
        }
        let newer = self.session.as_ref().is_none_or(|current| ts >= current.ts && current.event_id != event.event_id);
        if newer {
            self.session = Some(SessionInfo {
                kind: session.kind,
                title: session.title.clone(),
                starts_at: session.starts_at,
                ends_at: session.ends_at,
                status: session.status,
                ts,
                event_id: event.event_id.clone(),
            });
            changed = true;
        }
        changed
    }

    fn apply_role(&mut self, event: &Event, user: &str, role: Option<Role>) -> bool {
        let ts = event.origin_server_ts;
        let newer = self.roles.get(user).is_none_or(|current| ts >= current.ts && current.event_id != event.event_id);
        if newer {
            self.roles.insert(user.to_owned(), RoleEntry { role, ts, event_id: event.event_id.clone() });
        }
        newer
    }

    fn mark(&mut self, event: &Event, user: &str, channel: String, present: bool) -> bool {
        if self.marks.iter().any(|mark| mark.event_id == event.event_id) {
            return false;
        }
        // A mark that repeats the latest one of its channel (a profile change while joined, a
        // refreshed call membership) adds nothing.
        let latest = self
            .marks
            .iter()
            .filter(|mark| mark.user_id == user && mark.channel == channel)
            .reduce(|a, b| if b.ts >= a.ts { b } else { a });
        if latest.is_some_and(|latest| latest.present == present && event.origin_server_ts >= latest.ts) {
            return false;
        }
        self.marks.push(Mark {
            event_id: event.event_id.clone(),
            user_id: user.to_owned(),
            channel,
            ts: event.origin_server_ts,
            present,
        });
        true
    }

    /// The users with a role, and their role, sorted by user id.
    pub fn current_roles(&self) -> BTreeMap<String, Role> {
        self.roles.iter().filter_map(|(user, entry)| Some((user.clone(), entry.role?))).collect()
    }

    /// How long `user` was in the room and in the call (with any device) within
    /// `[start, end]`, in ms. Someone still in at the end counts until `end`.
    pub fn attendance_ms(&self, user: &str, start: u64, end: u64) -> (u64, u64) {
        let mut room = Vec::new();
        let mut call = Vec::new();
        let mut channels: BTreeMap<&str, Vec<&Mark>> = BTreeMap::new();
        for mark in self.marks.iter().filter(|mark| mark.user_id == user) {
            channels.entry(mark.channel.as_str()).or_default().push(mark);
        }
        for (channel, marks) in channels {
            let intervals = intervals(marks);
            if channel == ROOM_CHANNEL { room.extend(intervals) } else { call.extend(intervals) }
        }
        (overlap(&merge(room), start, end), overlap(&merge(call), start, end))
    }
}

/// The intervals a channel's marks describe (an interval still open ends at `u64::MAX`).
fn intervals(mut marks: Vec<&Mark>) -> Vec<(u64, u64)> {
    marks.sort_by_key(|mark| mark.ts); // stable: equal times keep their arrival order
    let mut out = Vec::new();
    let mut open = None;
    for mark in marks {
        match (mark.present, open) {
            (true, None) => open = Some(mark.ts),
            (false, Some(start)) => {
                out.push((start, mark.ts));
                open = None;
            }
            _ => {}
        }
    }
    if let Some(start) = open {
        out.push((start, u64::MAX));
    }
    out
}

/// Sorted, non-overlapping intervals covering the same time.
fn merge(mut intervals: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    intervals.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(intervals.len());
    for (start, end) in intervals {
        match out.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => out.push((start, end)),
        }
    }
    out
}

/// How much of the (non-overlapping) intervals lies within `[start, end]`.
fn overlap(intervals: &[(u64, u64)], start: u64, end: u64) -> u64 {
    intervals.iter().map(|&(s, e)| e.min(end).saturating_sub(s.max(start))).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str, event_type: &str, state_key: &str, sender: &str, ts: u64, content: serde_json::Value) -> Event {
        Event {
            event_id: id.into(),
            room_id: "!s:clinic.example".into(),
            sender: sender.into(),
            event_type: event_type.into(),
            state_key: Some(state_key.into()),
            content: content.to_string(),
            origin_server_ts: ts,
        }
    }

    fn member(id: &str, user: &str, ts: u64, membership: &str) -> Event {
        event(id, clinic::MEMBER, user, user, ts, serde_json::json!({ "membership": membership }))
    }

    fn call(id: &str, key: &str, sender: &str, ts: u64, content: serde_json::Value) -> Event {
        event(id, clinic::CALL_MEMBER, key, sender, ts, content)
    }

    const ANN: &str = "@ann:clinic.example";

    #[test]
    fn call_member_state_keys() {
        assert_eq!(call_user("_@ann:clinic.example_DEVICE"), Some(ANN));
        assert_eq!(call_user("@ann:clinic.example_DEVICE"), Some(ANN));
        assert_eq!(call_user("_@ann:clinic.example_DEVICE_m.call"), Some(ANN));
        assert_eq!(call_user("@ann:clinic.example"), Some(ANN));
        assert_eq!(call_user("_@a_b:clinic.example:8448_DEV"), Some("@a_b:clinic.example:8448"));
        assert_eq!(call_user("@ann"), None);
        assert_eq!(call_user("@:x"), None);
        assert_eq!(call_user("@a:_x"), None);
        assert_eq!(call_user(""), None);
        assert_eq!(call_user("ann:clinic.example"), None);
        assert!(in_call(&serde_json::json!({ "application": "m.call", "call_id": "" })));
        assert!(!in_call(&serde_json::json!({})));
        assert!(in_call(&serde_json::json!({ "memberships": [{ "call_id": "" }] })));
        assert!(!in_call(&serde_json::json!({ "memberships": [] })));
        assert!(!in_call(&serde_json::json!(null)));
    }

    #[test]
    fn room_presence_is_clipped_to_the_window() {
        let mut record = Record::default();
        assert!(record.apply(&member("$1", ANN, 1_000, "join")));
        assert!(record.apply(&member("$2", ANN, 5_000, "leave")));
        assert!(record.apply(&member("$3", ANN, 8_000, "join")));
        // A profile change while joined adds nothing; replays add nothing.
        assert!(!record.apply(&member("$4", ANN, 9_000, "join")));
        assert!(!record.apply(&member("$2", ANN, 5_000, "leave")));
        assert_eq!(record.marks.len(), 3);
        assert_eq!(record.attendance_ms(ANN, 0, 20_000), (4_000 + 12_000, 0));
        assert_eq!(record.attendance_ms(ANN, 2_000, 10_000), (3_000 + 2_000, 0));
        assert_eq!(record.attendance_ms(ANN, 5_000, 8_000), (0, 0));
        assert_eq!(record.attendance_ms("@bob:clinic.example", 0, 20_000), (0, 0));
    }

    #[test]
    fn marks_arriving_out_of_order_still_make_the_right_intervals() {
        let mut record = Record::default();
        // Seeded from the current state first (joined at 8 s), then the history arrives.
        record.apply(&member("$3", ANN, 8_000, "join"));
        record.apply(&member("$1", ANN, 1_000, "join"));
        record.apply(&member("$2", ANN, 5_000, "leave"));
        record.apply(&member("$3", ANN, 8_000, "join"));
        assert_eq!(record.attendance_ms(ANN, 0, 10_000), (4_000 + 2_000, 0));
    }

    #[test]
    fn call_presence_per_device_is_united() {
        let mut record = Record::default();
        let on = serde_json::json!({ "application": "m.call", "call_id": "", "device_id": "A" });
        record.apply(&call("$1", "_@ann:clinic.example_A", ANN, 1_000, on.clone()));
        record.apply(&call("$2", "_@ann:clinic.example_B", ANN, 3_000, on.clone()));
        record.apply(&call("$3", "_@ann:clinic.example_A", ANN, 6_000, serde_json::json!({})));
        record.apply(&call("$4", "_@ann:clinic.example_B", ANN, 7_000, serde_json::json!({})));
        // Legacy per-user content.
        record.apply(&call("$5", ANN, ANN, 10_000, serde_json::json!({ "memberships": [{ "call_id": "" }] })));
        record.apply(&call("$6", ANN, ANN, 12_000, serde_json::json!({ "memberships": [] })));
        assert_eq!(record.attendance_ms(ANN, 0, 20_000), (0, 6_000 + 2_000));
        // Someone else's call membership cannot be forged.
        assert!(!record.apply(&call("$7", "_@bob:clinic.example_X", ANN, 1_000, on)));
        assert_eq!(record.attendance_ms("@bob:clinic.example", 0, 20_000), (0, 0));
    }

    #[test]
    fn statuses_keep_their_first_time_and_the_session_follows_the_newest_event() {
        let session = |id: &str, ts: u64, status: &str, title: &str| {
            event(
                id,
                clinic::SESSION,
                "",
                "@t:clinic.example",
                ts,
                serde_json::json!({
                    "kind": "group", "title": title, "starts_at": 100, "ends_at": 200, "timezone": "UTC",
                    "status": status, "max_participants": 12,
                }),
            )
        };
        let mut record = Record::default();
        assert!(record.apply(&session("$1", 10, "scheduled", "A")));
        assert!(record.apply(&session("$2", 20, "in_progress", "A")));
        assert!(record.apply(&session("$3", 30, "in_progress", "B")));
        assert!(!record.apply(&session("$2", 20, "in_progress", "A")), "a replayed older event changes nothing");
        assert_eq!(record.session.as_ref().unwrap().title, "B");
        assert_eq!(record.statuses.get(&Status::InProgress), Some(&20));
        assert!(record.apply(&session("$4", 40, "completed", "B")));
        let json = serde_json::to_string(&record).unwrap();
        assert!(json.contains(r#""in_progress":20"#), "{json}");
        assert_eq!(serde_json::from_str::<Record>(&json).unwrap(), record);
        let mut bad = session("$5", 50, "completed", "B");
        bad.content = r#"{"kind": "party"}"#.into();
        assert!(!record.apply(&bad));
    }

    #[test]
    fn roles_follow_the_newest_event() {
        let role = |id: &str, user: &str, ts: u64, role: Option<&str>| {
            event(
                id,
                clinic::ROLE,
                &clinic::role_key(user),
                "@t:clinic.example",
                ts,
                serde_json::json!({ "role": role }),
            )
        };
        let mut record = Record::default();
        record.apply(&role("$1", ANN, 10, Some("client")));
        record.apply(&role("$2", "@t:clinic.example", 10, Some("therapist")));
        record.apply(&role("$3", ANN, 20, None));
        assert!(!record.apply(&role("$1", ANN, 10, Some("client"))));
        assert_eq!(
            record.current_roles().into_iter().collect::<Vec<_>>(),
            [("@t:clinic.example".into(), Role::Therapist)]
        );
        record.apply(&role("$4", ANN, 30, Some("client")));
        assert_eq!(record.current_roles().get(ANN), Some(&Role::Client));
        // Malformed ones are ignored.
        assert!(!record.apply(&role("$5", ANN, 40, Some("chef"))));
        assert!(!record.apply(&event("$6", clinic::ROLE, ANN, ANN, 40, serde_json::json!({ "role": "client" }))));
    }
}
